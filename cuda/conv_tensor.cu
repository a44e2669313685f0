// launch_tensor: picks the tensor-core kernel's instantiation for the activation dtype and MT. The
// kernel itself is conv_tensor.cuh; each <dtype, MT> pair is compiled in a file of its own.
#include "kernels.cuh"

namespace sparsebench {

namespace {

template <typename T>
std::string launch_dtype(const ConvArgs& a, const TensorCfg& t, int MT, int64_t smem, cudaStream_t s) {
  switch (MT) {
    case 1: return launch_tensor_mt<T, 1>(a, t, smem, s);
    case 2: return launch_tensor_mt<T, 2>(a, t, smem, s);
    case 4: return launch_tensor_mt<T, 4>(a, t, smem, s);
    case 8: return launch_tensor_mt<T, 8>(a, t, smem, s);
    default: return "tensor-core kernels: MT must be 1, 2, 4 or 8";
  }
}

}  // namespace

std::string launch_tensor(const ConvArgs& a, const TensorCfg& t, int MT, int64_t smem_bytes, cudaStream_t stream) {
  switch (a.act_dtype) {
    case kF16: return launch_dtype<__half>(a, t, MT, smem_bytes, stream);
    case kBF16: return launch_dtype<__nv_bfloat16>(a, t, MT, smem_bytes, stream);
    default: return "tensor-core kernels: activations must be fp16 or bf16";
  }
}

}  // namespace sparsebench
