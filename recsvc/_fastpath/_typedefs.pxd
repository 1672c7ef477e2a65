# One home for the C types used by every kernel, named after numpy dtypes
# (as in scikit-learn's sklearn/utils/_typedefs.pxd). cimport from here:
#     from recsvc._fastpath._typedefs cimport float32_t, int32_t

ctypedef float float32_t
ctypedef double float64_t
ctypedef signed char int8_t
ctypedef signed int int32_t
ctypedef signed long long int64_t
ctypedef unsigned char uint8_t
ctypedef unsigned int uint32_t
ctypedef unsigned long long uint64_t
ctypedef Py_ssize_t intp_t
