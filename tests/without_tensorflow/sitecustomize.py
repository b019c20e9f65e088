"""On PYTHONPATH, this makes a Python a machine without TensorFlow (as the GPU machines that have
PyTorch alone are): importing tensorflow, keras or tensorflow_datasets fails as it does there, in
this process and in every trial process it spawns (they inherit PYTHONPATH)."""

import sys

ABSENT = ("tensorflow", "keras", "tf_keras", "tensorflow_datasets")


class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _Absent())
