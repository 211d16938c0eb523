// The fastclip._C Python module. Importing it loads this library, which registers the ops with the
// PyTorch dispatcher: each op's schema in ops/<op>.cpp (TORCH_LIBRARY_FRAGMENT), its CPU and CUDA
// implementations in cpu/ and cuda/.
#include <Python.h>

// A plain module with no functions: importing it is what loads the library and registers the ops.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastclip compiled operators", -1, nullptr};
  return PyModule_Create(&module);
}
