"""The merge numerics beneath the operators (workers/operators.py): the compiled and eager merge
paths, the magnitude selection and cuts, the DARE/DELLA draws, the Gram-based geometry, and the
native C++ kernels (``*.cpp``, ``*.h``) that workers/kernels/native.py builds on first use.
Pure tensor functions; nothing here knows recipes, Ray or the database."""
