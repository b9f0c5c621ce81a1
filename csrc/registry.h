// Each family binds its own launchers from its own csrc/<family>_bindings.cpp:
//
//     FASTFUSE_BIND_FAMILY(sam) { m.def("sam_map_forward", ...); }
//
// The macro registers the function in a static list that bindings.cpp walks when Python imports
// fastfuse._C, so adding a family is adding files (kernels/<family>.cuh, csrc/<family>.h,
// csrc/<family>.cu, csrc/<family>_bindings.cpp) and editing none. setup.py compiles every
// csrc/*.cu and csrc/*.cpp it finds.
#pragma once

#include <utility>
#include <vector>

#include <pybind11/pybind11.h>

namespace fastfuse {

using FamilyBinder = void (*)(pybind11::module_&);

// Function-local static: safe to use from other translation units' static initializers.
std::vector<std::pair<const char*, FamilyBinder>>& family_binders();

struct FamilyRegistration {
  FamilyRegistration(const char* name, FamilyBinder bind) { family_binders().emplace_back(name, bind); }
};

}  // namespace fastfuse

#define FASTFUSE_BIND_FAMILY(family)                                                          \
  static void fastfuse_bind_##family(pybind11::module_& m);                                   \
  static const ::fastfuse::FamilyRegistration fastfuse_registration_##family(#family,         \
                                                                           &fastfuse_bind_##family); \
  static void fastfuse_bind_##family(pybind11::module_& m)
