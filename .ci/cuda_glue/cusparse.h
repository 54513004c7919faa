// Stand-in for the cuSPARSE header (see cublas_v2.h here): what torch's headers name.
#pragma once
typedef struct cusparseContext* cusparseHandle_t;
typedef enum { CUSPARSE_STATUS_SUCCESS = 0 } cusparseStatus_t;
#ifdef __cplusplus
extern "C" {
#endif
const char* cusparseGetErrorString(cusparseStatus_t status);
#ifdef __cplusplus
}
#endif
