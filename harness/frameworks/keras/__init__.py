"""Keras (TensorFlow backend) behind the framework seam (harness/frameworks/base.py).

Nothing is imported here: the registry (backbones.py) is plain data that config checks read
without TensorFlow; `framework.py` holds the implementation, imported when a process trains.

    backbones.py   the keras.applications registry, blocks and preprocessing
    model.py       backbone + head, freezing by blocks
    loop.py        one phase: compile, fit, callbacks, the best weights
    data.py        decoding and tf.data pipelines
    features.py    frozen activations and the part of a model above them
    device.py      TensorFlow's import, GPUs, switches, seeding, memory
"""
