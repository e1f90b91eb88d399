// Compiled instead of cuda/ when the build has no CUDA backend.
#include "engine/memory.h"

namespace mv {
const CudaHooks* cuda_hooks() { return nullptr; }
}  // namespace mv
