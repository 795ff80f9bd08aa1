/*
 * kernels/loss_rows_f16.cu - the fused row kernel (kernels/loss_row.cuh)
 * for f16 student logits and each teacher dtype.  One translation unit
 * per student dtype so that a parallel build compiles them side by side.
 */
#include "loss_row.cuh"

namespace kdl {

RowKernelFn row_kernel_f16(int teacher_dtype)
{
    switch (teacher_dtype) {
    case KDL_DTYPE_F32: return loss_row_kernel<TF16, TF32>;
    case KDL_DTYPE_F16: return loss_row_kernel<TF16, TF16>;
    default: return loss_row_kernel<TF16, TBF16>;
    }
}

} // namespace kdl
