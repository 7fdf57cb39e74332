// pybind11 definitions of flr_engine._C (the only file that knows about Python).
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "flr-engine host-side C++ engine";
  m.attr("__build_info__") = "cpp17"
#ifdef _OPENMP
      "+openmp"
#endif
      ;
}
