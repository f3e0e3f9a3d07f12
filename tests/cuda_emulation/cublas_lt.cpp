// The cuBLASLt stand-in of the CUDA emulation (include/cublasLt.h): column-major
// D = alpha·op(A)·op(B) + beta·C on the CPU. FP32 compute as on the GPU: products (exact for bf16
// inputs) summed in fp32, in an order of the vectoriser's (cuBLASLt's own order is unspecified
// too, and the GPU tests' bounds allow for any), then alpha and beta in fp32 and one rounding to
// D's type — no split-K.
#include <cublasLt.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

struct Context {};

float load(const void* p, cudaDataType_t t, int64_t i) {
  if (t == CUDA_R_32F) return static_cast<const float*>(p)[i];
  return tsp::bf16::to_float(static_cast<const uint16_t*>(p)[i]);
}
void store(void* p, cudaDataType_t t, int64_t i, float v) {
  if (t == CUDA_R_32F)
    static_cast<float*>(p)[i] = v;
  else
    static_cast<uint16_t*>(p)[i] = tsp::bf16::from_float(v);
}
bool known(cudaDataType_t t) {
  return t == CUDA_R_32F || t == CUDA_R_16BF;
}
uint32_t alignment_of(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  uint32_t align = 256;
  while (align > 1 && a % align) align /= 2;
  return align;
}

// What the heuristic's one "algorithm" remembers: the alignments the caller promised.
struct Algo {
  uint32_t align[4];
};
static_assert(sizeof(Algo) <= sizeof(cublasLtMatmulAlgo_t));

// op(X) is r×c when X is stored as `l` (rows×cols column-major).
bool fits(const cublasLtMatrixLayoutOpaque_t* l, cublasOperation_t op, uint64_t r, uint64_t c) {
  const uint64_t rows = op == CUBLAS_OP_N ? r : c, cols = op == CUBLAS_OP_N ? c : r;
  return l->rows == rows && l->cols == cols &&
         l->ld >= static_cast<int64_t>(std::max<uint64_t>(rows, 1));
}

cublasStatus_t check(cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                     cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d) {
  if (!desc || !a || !b || !c || !d) return CUBLAS_STATUS_INVALID_VALUE;
  if (desc->compute != CUBLAS_COMPUTE_32F && desc->compute != CUBLAS_COMPUTE_32F_FAST_TF32)
    return CUBLAS_STATUS_NOT_SUPPORTED;
  if (desc->scale != CUDA_R_32F || a->type != b->type || c->type != d->type || !known(a->type) ||
      !known(d->type))
    return CUBLAS_STATUS_NOT_SUPPORTED;
  const uint64_t m = d->rows, n = d->cols;
  const uint64_t k = desc->ta == CUBLAS_OP_N ? a->cols : a->rows;
  if (k == 0 || c->rows != m || c->cols != n || c->ld != d->ld) return CUBLAS_STATUS_INVALID_VALUE;
  if (!fits(a, desc->ta, m, k) || !fits(b, desc->tb, k, n) || d->ld < static_cast<int64_t>(m))
    return CUBLAS_STATUS_INVALID_VALUE;
  return CUBLAS_STATUS_SUCCESS;
}

}  // namespace

size_t cublasLtGetVersion() {
  return 130000;
}
const char* cublasLtGetStatusName(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS:
      return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED:
      return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_EXECUTION_FAILED:
      return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "CUBLAS_STATUS_NOT_SUPPORTED";
  }
  return "CUBLAS_STATUS_?";
}
const char* cublasLtGetStatusString(cublasStatus_t s) {
  return cublasLtGetStatusName(s);
}
cublasStatus_t cublasLtCreate(cublasLtHandle_t* handle) {
  *handle = reinterpret_cast<cublasLtHandle_t>(new Context);
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtDestroy(cublasLtHandle_t handle) {
  delete reinterpret_cast<Context*>(handle);
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* desc, cublasComputeType_t compute,
                                        cudaDataType_t scale) {
  *desc = new cublasLtMatmulDescOpaque_t{compute, scale};
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc) {
  delete desc;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc,
                                              cublasLtMatmulDescAttributes_t attr, const void* buf,
                                              size_t size) {
  if (size != sizeof(cublasOperation_t)) return CUBLAS_STATUS_INVALID_VALUE;
  cublasOperation_t op;
  std::memcpy(&op, buf, size);
  if (op != CUBLAS_OP_N && op != CUBLAS_OP_T) return CUBLAS_STATUS_INVALID_VALUE;
  if (attr == CUBLASLT_MATMUL_DESC_TRANSA)
    desc->ta = op;
  else if (attr == CUBLASLT_MATMUL_DESC_TRANSB)
    desc->tb = op;
  else
    return CUBLAS_STATUS_INVALID_VALUE;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* layout, cudaDataType_t type,
                                          uint64_t rows, uint64_t cols, int64_t ld) {
  *layout = new cublasLtMatrixLayoutOpaque_t{type, rows, cols, ld};
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout) {
  delete layout;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* pref) {
  *pref = new cublasLtMatmulPreferenceOpaque_t;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref) {
  delete pref;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref,
                                                    cublasLtMatmulPreferenceAttributes_t attr,
                                                    const void* buf, size_t size) {
  switch (attr) {
    case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES:
      if (size != sizeof(uint64_t)) return CUBLAS_STATUS_INVALID_VALUE;
      std::memcpy(&pref->max_workspace, buf, size);
      return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK:
      if (size != sizeof(uint32_t)) return CUBLAS_STATUS_INVALID_VALUE;
      std::memcpy(&pref->reduction_mask, buf, size);
      return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES:
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES:
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES:
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES:
      if (size != sizeof(uint32_t)) return CUBLAS_STATUS_INVALID_VALUE;
      std::memcpy(&pref->align[attr - CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES], buf, size);
      return CUBLAS_STATUS_SUCCESS;
  }
  return CUBLAS_STATUS_INVALID_VALUE;
}

cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc,
                                              cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                                              cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d,
                                              cublasLtMatmulPreference_t pref, int requested,
                                              cublasLtMatmulHeuristicResult_t* results,
                                              int* returned) {
  if (!handle || !pref || requested < 1) return CUBLAS_STATUS_INVALID_VALUE;
  if (const cublasStatus_t s = check(desc, a, b, c, d); s != CUBLAS_STATUS_SUCCESS) return s;
  // The one algorithm: no split-K (a reduction scheme every mask allows), no workspace.
  *returned = 1;
  results[0] = cublasLtMatmulHeuristicResult_t{};
  Algo algo{};
  std::memcpy(algo.align, pref->align, sizeof algo.align);
  std::memcpy(&results[0].algo, &algo, sizeof algo);
  results[0].workspaceSize = 0;
  results[0].state = CUBLAS_STATUS_SUCCESS;
  results[0].wavesCount = 1.f;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmul(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, const void* alpha,
                              const void* A, cublasLtMatrixLayout_t a, const void* B,
                              cublasLtMatrixLayout_t b, const void* beta, const void* C,
                              cublasLtMatrixLayout_t c, void* D, cublasLtMatrixLayout_t d,
                              const cublasLtMatmulAlgo_t* algo, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream) {
  if (!handle || !algo) return CUBLAS_STATUS_INVALID_VALUE;
  if (const cublasStatus_t s = check(desc, a, b, c, d); s != CUBLAS_STATUS_SUCCESS) return s;
  // Pointers must be as aligned as the plan was promised (an algorithm chosen for that alignment
  // may use wider loads on a GPU), and inside device memory.
  Algo promised;
  std::memcpy(&promised, algo, sizeof promised);
  const void* ptrs[4] = {A, B, C, D};
  for (int i = 0; i < 4; ++i)
    if (alignment_of(ptrs[i]) < promised.align[i]) return CUBLAS_STATUS_INVALID_VALUE;
  (void)workspace;
  (void)workspace_bytes;
  const int64_t m = static_cast<int64_t>(d->rows), n = static_cast<int64_t>(d->cols);
  const int64_t k = static_cast<int64_t>(desc->ta == CUBLAS_OP_N ? a->cols : a->rows);
  const size_t ab = a->type == CUDA_R_32F ? 4 : 2, db = d->type == CUDA_R_32F ? 4 : 2;
  auto last = [](cublasLtMatrixLayout_t l) {
    return (static_cast<int64_t>(l->cols) - 1) * l->ld + static_cast<int64_t>(l->rows);
  };
  if (!tsp::emu::is_device_range(A, last(a) * ab) || !tsp::emu::is_device_range(B, last(b) * ab) ||
      !tsp::emu::is_device_range(D, last(d) * db) || !tsp::emu::is_device_range(C, last(c) * db))
    return CUBLAS_STATUS_INVALID_VALUE;
  // alpha and beta are host scalars (the default pointer mode): read at the call. The product
  // runs in stream order, with copies of the descriptors (the caller may change them after).
  float fa, fb;
  std::memcpy(&fa, alpha, 4);
  std::memcpy(&fb, beta, 4);
  tsp::emu::enqueue(stream, [=, ta = desc->ta, tb = desc->tb, la = *a, lb = *b, lc = *c, ld = *d] {
    // op(A) as rows of k and op(B) as columns of k, widened to float once: each element of D is
    // then one contiguous dot product.
    std::vector<float> ar(static_cast<size_t>(m) * k), bc(static_cast<size_t>(n) * k);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t p = 0; p < k; ++p)
        ar[i * k + p] = load(A, la.type, ta == CUBLAS_OP_N ? i + p * la.ld : p + i * la.ld);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t p = 0; p < k; ++p)
        bc[j * k + p] = load(B, lb.type, tb == CUBLAS_OP_N ? p + j * lb.ld : j + p * lb.ld);
    // C may be D (in place): every element of D reads only its own C element, before writing it.
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < m; ++i) {
        const float* x = &ar[i * k];
        const float* y = &bc[j * k];
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t p = 0; p < k; ++p) acc += x[p] * y[p];
        float v = fa * acc;
        if (fb != 0.f) v = v + fb * load(C, lc.type, i + j * lc.ld);
        store(D, ld.type, i + j * ld.ld, v);
      }
  });
  return CUBLAS_STATUS_SUCCESS;
}
