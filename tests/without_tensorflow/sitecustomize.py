"""On PYTHONPATH, this makes a Python a machine without TensorFlow (as the GPU machines that have
PyTorch alone are): tensorflow, keras and tensorflow_datasets are not found, by an import or by
`importlib.util.find_spec` (which libraries use to ask), in this process and in every trial
process it spawns (they inherit PYTHONPATH)."""

import importlib.machinery

ABSENT = ("tensorflow", "keras", "tf_keras", "tensorflow_datasets")
_find_spec = importlib.machinery.PathFinder.find_spec.__func__


def _find_spec_without(cls, fullname, path=None, target=None):
    if fullname.split(".")[0] in ABSENT:
        return None  # not installed: an import raises ModuleNotFoundError, find_spec answers None
    return _find_spec(cls, fullname, path, target)


importlib.machinery.PathFinder.find_spec = classmethod(_find_spec_without)
