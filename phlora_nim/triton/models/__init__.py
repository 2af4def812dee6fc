"""Logic of the Python-backend models in the Triton model repository.

Each ``model_repository/<model>/1/model.py`` only subclasses a class from here and hands it
Triton's ``triton_python_backend_utils`` module as ``pb``; everything else is importable and
testable without Triton.
"""
