// Python module init of sp_kernels._C. It exposes no Python functions: importing the module loads
// the shared library, whose static TORCH_LIBRARY initialisers register the ops with the dispatcher.
#include <Python.h>

namespace {

PyModuleDef sp_kernels_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "sp_kernels native ops (registered under torch.ops.sp_kernels)",
    -1,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C() {
  return PyModule_Create(&sp_kernels_module);
}
