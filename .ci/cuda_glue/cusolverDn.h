// Stand-in for the cuSOLVER dense header (see cublas_v2.h here): the handle type torch's headers name.
#pragma once
#include "cusolver_common.h"
typedef struct cusolverDnContext* cusolverDnHandle_t;
