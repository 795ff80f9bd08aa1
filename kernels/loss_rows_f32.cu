/*
 * kernels/loss_rows_f32.cu - the fused row kernel (kernels/loss_row.cuh)
 * for f32 student logits and each teacher dtype.  One translation unit
 * per student dtype so that a parallel build compiles them side by side.
 */
#include "loss_row.cuh"

namespace kdl {

RowKernelFn row_kernel_f32(int teacher_dtype)
{
    switch (teacher_dtype) {
    case KDL_DTYPE_F32: return loss_row_kernel<TF32, TF32>;
    case KDL_DTYPE_F16: return loss_row_kernel<TF32, TF16>;
    default: return loss_row_kernel<TF32, TBF16>;
    }
}

} // namespace kdl
