// Stand-in for the cuSOLVER header (see cublas_v2.h here): what torch's headers name.
#pragma once
typedef enum { CUSOLVER_STATUS_SUCCESS = 0, CUSOLVER_STATUS_INVALID_VALUE = 3 } cusolverStatus_t;
