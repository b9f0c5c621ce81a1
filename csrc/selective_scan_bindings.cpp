// Python bindings of the selective scan launchers (csrc/selective_scan.h). The GIL is released
// while queuing work.
#include "registry.h"
#include "selective_scan.h"

namespace py = pybind11;

FASTFUSE_BIND_FAMILY(selective_scan) {
  m.def("selective_scan_forward", &fastfuse::selective_scan_forward, py::arg("u"), py::arg("delta"), py::arg("A"),
        py::arg("B"), py::arg("C"), py::arg("D"), py::arg("z"), py::arg("delta_bias"), py::arg("out"),
        py::arg("last_state"), py::arg("chunk_states"), py::arg("batch"), py::arg("dim"), py::arg("length"),
        py::arg("n_state"), py::arg("groups"), py::arg("chunk"), py::arg("threads_per_channel"), py::arg("tile"),
        py::arg("dtype"), py::arg("bc_dtype"), py::arg("delta_softplus"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "Selective scan forward: out, last state and chunk start states, queued on `stream`.");
  m.def("selective_scan_backward", &fastfuse::selective_scan_backward, py::arg("dout"), py::arg("dlast_state"),
        py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("z"),
        py::arg("delta_bias"), py::arg("chunk_states"), py::arg("scratch"), py::arg("du"), py::arg("ddelta"),
        py::arg("dz"), py::arg("dB"), py::arg("dC"), py::arg("dA"), py::arg("dD"), py::arg("dbias"),
        py::arg("batch"), py::arg("dim"), py::arg("length"), py::arg("n_state"), py::arg("groups"), py::arg("chunk"),
        py::arg("threads_per_channel"), py::arg("tile"), py::arg("dtype"), py::arg("bc_dtype"),
        py::arg("delta_softplus"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "Selective scan backward: du, ddelta, dz, dB, dC and per-batch dA/dD/dbias partials, queued on `stream`.");
  m.def(
      "selective_scan_plan",
      [](std::int64_t batch, std::int64_t dim, std::int64_t length, std::int64_t n_state, std::int64_t groups,
         std::int64_t chunk, int threads_per_channel) {
        const auto p = fastfuse::selective_scan_plan(batch, dim, length, n_state, groups, chunk, threads_per_channel);
        py::dict d;
        d["threads"] = p.threads;
        d["max_states_per_thread"] = p.max_states_per_thread;
        d["max_tile"] = p.max_tile;
        d["max_shared_bytes"] = p.max_shared_bytes;
        d["blocks"] = p.blocks;
        d["scratch_elements"] = p.scratch_elements;
        d["accumulate_bc"] = p.accumulate_bc;
        return d;
      },
      py::arg("batch"), py::arg("dim"), py::arg("length"), py::arg("n_state"), py::arg("groups"), py::arg("chunk"),
      py::arg("threads_per_channel"),
      "Block size, limits, grid size, backward scratch size and whether dB/dC are atomic sums (no CUDA call).");
}
