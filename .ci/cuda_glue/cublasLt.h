// Stand-in for the cuBLASLt header (see cublas_v2.h here): the handle type torch's headers name.
#pragma once
#include "cublas_v2.h"
typedef struct cublasLtContext* cublasLtHandle_t;
