// pybind11 definitions of flr_engine._C (the only file that knows about Python).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "packer.h"

namespace py = pybind11;

namespace {

using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

// A 1-D int64 numpy array that takes ownership of the vector's buffer (no copy).
py::array_t<int64_t> to_numpy(std::vector<int64_t>&& v) {
  if (v.empty()) return py::array_t<int64_t>(0);
  auto* owned = new std::vector<int64_t>(std::move(v));
  py::capsule owner(owned, [](void* p) { delete static_cast<std::vector<int64_t>*>(p); });
  return py::array_t<int64_t>({static_cast<py::ssize_t>(owned->size())},
                              {static_cast<py::ssize_t>(sizeof(int64_t))}, owned->data(), owner);
}

[[noreturn]] void throw_bad_token(py::ssize_t i, py::ssize_t j, PyObject* item) {
  const bool overflow = PyErr_ExceptionMatches(PyExc_OverflowError);
  PyErr_Clear();
  std::string where = "sequences[" + std::to_string(i) + "][" + std::to_string(j) + "]";
  if (overflow) {
    PyErr_SetString(PyExc_OverflowError, (where + ": token id out of int64 range").c_str());
    throw py::error_already_set();
  }
  throw py::type_error(where + ": expected an int token id, got " +
                       std::string(Py_TYPE(item)->tp_name));
}

// Checks a numpy array is 1-D with an integer dtype, and returns it as C-contiguous int64.
I64Array int_array_1d(const py::array& a, const std::string& what) {
  const char kind = a.dtype().kind();
  if (kind != 'i' && kind != 'u') {
    throw py::type_error(what + " must have an integer dtype, got " +
                         std::string(py::str(a.dtype())));
  }
  if (a.ndim() != 1) {
    throw py::value_error(what + " must be 1-D, got " + std::to_string(a.ndim()) + " dims");
  }
  return I64Array::ensure(a);
}

struct NestedInput {
  std::vector<int64_t> tokens;
  std::vector<int64_t> offsets;
};

// list/tuple of (list/tuple of ints | 1-D integer numpy array) -> flat tokens + offsets.
NestedInput flatten_nested(const py::handle& sequences) {
  PyObject* outer = PySequence_Fast(sequences.ptr(),
                                    "sequences must be a sequence of token sequences, or a "
                                    "(flat tokens, offsets) pair of numpy arrays");
  if (outer == nullptr) throw py::error_already_set();
  auto outer_guard = py::reinterpret_steal<py::object>(outer);
  const py::ssize_t n = PySequence_Fast_GET_SIZE(outer);
  PyObject** items = PySequence_Fast_ITEMS(outer);

  NestedInput in;
  in.offsets.reserve(static_cast<std::size_t>(n) + 1);
  std::size_t total = 0;  // size hint only; errors surface in the conversion pass
  for (py::ssize_t i = 0; i < n; ++i) {
    const py::ssize_t len = PyObject_Length(items[i]);
    if (len < 0) {
      PyErr_Clear();
    } else {
      total += static_cast<std::size_t>(len);
    }
  }
  in.tokens.reserve(total);
  in.offsets.push_back(0);
  for (py::ssize_t i = 0; i < n; ++i) {
    py::handle item(items[i]);
    if (py::isinstance<py::array>(item)) {
      I64Array a = int_array_1d(py::reinterpret_borrow<py::array>(item),
                                "sequences[" + std::to_string(i) + "]");
      in.tokens.insert(in.tokens.end(), a.data(), a.data() + a.size());
    } else {
      const std::string msg = "sequences[" + std::to_string(i) + "] must be a sequence of ints";
      PyObject* inner = PySequence_Fast(item.ptr(), msg.c_str());
      if (inner == nullptr) throw py::error_already_set();
      auto inner_guard = py::reinterpret_steal<py::object>(inner);
      const py::ssize_t m = PySequence_Fast_GET_SIZE(inner);
      PyObject** toks = PySequence_Fast_ITEMS(inner);
      for (py::ssize_t j = 0; j < m; ++j) {
        const long long v = PyLong_AsLongLong(toks[j]);
        if (v == -1 && PyErr_Occurred()) throw_bad_token(i, j, toks[j]);
        in.tokens.push_back(static_cast<int64_t>(v));
      }
    }
    in.offsets.push_back(static_cast<int64_t>(in.tokens.size()));
  }
  return in;
}

py::dict to_python(flr::PackOutput&& out, std::vector<int64_t>&& seq_offsets) {
  py::list packs;
  for (flr::Pack& p : out.packs) {
    py::dict d;
    d["input_ids"] = to_numpy(std::move(p.input_ids));
    d["position_ids"] = to_numpy(std::move(p.position_ids));
    d["parent"] = to_numpy(std::move(p.parent));
    d["subtree_end"] = to_numpy(std::move(p.subtree_end));
    d["seq_start"] = p.seq_start;
    d["seq_end"] = p.seq_end;
    d["num_total"] = p.num_total;
    packs.append(std::move(d));
  }
  py::dict r;
  r["packs"] = std::move(packs);
  r["pack_of_seq"] = to_numpy(std::move(out.pack_of_seq));
  r["node_index"] = to_numpy(std::move(out.node_index));
  r["seq_offsets"] = to_numpy(std::move(seq_offsets));
  return r;
}

py::dict pack_flat(const py::array& tokens, const py::array& offsets, int64_t token_budget) {
  I64Array tok = int_array_1d(tokens, "tokens");
  I64Array off = int_array_1d(offsets, "offsets");
  if (off.size() < 1) throw py::value_error("offsets must have at least one entry (S + 1)");
  const int64_t num_seqs = static_cast<int64_t>(off.size()) - 1;
  if (off.data()[num_seqs] != static_cast<int64_t>(tok.size())) {
    throw py::value_error("offsets[-1] (" + std::to_string(off.data()[num_seqs]) +
                          ") must equal len(tokens) (" + std::to_string(tok.size()) + ")");
  }
  std::vector<int64_t> seq_offsets(off.data(), off.data() + off.size());
  flr::PackOutput out;
  {
    py::gil_scoped_release nogil;
    out = flr::pack_sequences(tok.data(), seq_offsets.data(), num_seqs, token_budget);
  }
  return to_python(std::move(out), std::move(seq_offsets));
}

py::dict pack_any(const py::object& sequences, int64_t token_budget) {
  if (py::isinstance<py::tuple>(sequences)) {
    auto t = py::reinterpret_borrow<py::tuple>(sequences);
    if (t.size() == 2 && py::isinstance<py::array>(t[0]) && py::isinstance<py::array>(t[1])) {
      return pack_flat(t[0].cast<py::array>(), t[1].cast<py::array>(), token_budget);
    }
  }
  NestedInput in = flatten_nested(sequences);
  const int64_t num_seqs = static_cast<int64_t>(in.offsets.size()) - 1;
  flr::PackOutput out;
  {
    py::gil_scoped_release nogil;
    out = flr::pack_sequences(in.tokens.data(), in.offsets.data(), num_seqs, token_budget);
  }
  return to_python(std::move(out), std::move(in.offsets));
}

constexpr const char* kPackDoc = R"doc(
Pack token sequences into token tries (see flr_engine.engine.packer for the layout).

sequences: a list of token sequences (lists/tuples of ints or 1-D integer numpy arrays), or a
    (flat tokens, offsets) pair of 1-D integer numpy arrays, sequence s being
    tokens[offsets[s]:offsets[s + 1]] (a 2-tuple of numpy arrays is always read as this pair:
    pass two array sequences as a list).
token_budget: max unique tokens per pack (a single longer sequence gets a pack of its own).

Returns a dict: "packs" (list of dicts with int64 arrays input_ids, position_ids, parent,
subtree_end and ints seq_start, seq_end, num_total), and int64 arrays "pack_of_seq" (S,),
"node_index" (total tokens,), "seq_offsets" (S + 1,). Raises ValueError for an empty sequence
(naming its index) or token_budget < 1. The GIL is released while packing.
)doc";

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "flr-engine host-side C++ engine";
  m.attr("__build_info__") = "cpp17"
#ifdef _OPENMP
      "+openmp"
#endif
      ;
  m.def("pack_sequences", &pack_any, py::arg("sequences"), py::arg("token_budget"), kPackDoc);
  m.def("pack_flat", &pack_flat, py::arg("tokens"), py::arg("offsets"), py::arg("token_budget"),
        "pack_sequences for the (flat tokens, offsets) form; same result dict.");
}
