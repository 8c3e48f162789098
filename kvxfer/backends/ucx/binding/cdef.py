"""The C declarations of the UCP API (and the few libc calls) that kvxfer binds with cffi in ABI mode.

ABI mode reads nothing from headers: every struct handed to UCP is declared here in full and in field order, as
in UCX 1.22's ``ucp.h`` (tests/backends/ucx/test_binding.py compiles these layouts against the wheel's headers when
a C compiler is present). UCP parameter structs only ever grow at their end and are read according to their
``field_mask``, so these layouts also serve older and newer 1.x libraries. ``ucs_status_t`` is a *packed* enum:
one signed byte.

Hot-path functions take and return addresses as ``uintptr_t`` instead of pointers: on the ABIs we run on
(x86-64, aarch64) both travel in the same integer registers, and Python ints then need no ``ffi.cast`` per call.
Returned ``ucs_status_ptr_t`` values are therefore ints: 0 = done, ``>= 2**64 - 100`` = an error status, else a
request.
"""

UCP_TYPES_CDEF = r"""
typedef int8_t ucs_status_t;
typedef int ucs_thread_mode_t;
typedef int ucs_memory_type_t;
typedef int ucp_err_handling_mode_t;
typedef uint64_t ucp_datatype_t;
typedef struct ucp_context *ucp_context_h;
typedef struct ucp_config ucp_config_t;
typedef struct ucp_worker *ucp_worker_h;
typedef struct ucp_ep *ucp_ep_h;
typedef struct ucp_mem *ucp_mem_h;
typedef struct ucp_rkey *ucp_rkey_h;
typedef struct ucp_address ucp_address_t;

typedef struct { unsigned long ucs_bits[16]; } ucs_cpu_set_t;
typedef struct { const void *addr; uint32_t addrlen; } ucs_sock_addr_t;
typedef struct { uint64_t opaque[16]; } kvx_sockaddr_storage_t;

typedef void (*ucp_err_handler_cb_t)(void *arg, ucp_ep_h ep, ucs_status_t status);
typedef ucs_status_t (*ucp_am_recv_callback_t)(void *arg, const void *header, size_t header_length,
                                               void *data, size_t length, const void *param);

typedef struct {
    uint64_t field_mask;
    uint64_t features;
    size_t request_size;
    void *request_init;
    void *request_cleanup;
    uint64_t tag_sender_mask;
    int mt_workers_shared;
    size_t estimated_num_eps;
    size_t estimated_num_ppn;
    const char *name;
    size_t node_local_id;
} ucp_params_t;

typedef struct {
    uint64_t field_mask;
    ucs_thread_mode_t thread_mode;
    ucs_cpu_set_t cpu_mask;
    unsigned events;
    void *user_data;
    int event_fd;
    uint64_t flags;
    const char *name;
    size_t am_alignment;
    uint64_t client_id;
} ucp_worker_params_t;

typedef struct {
    ucp_err_handler_cb_t cb;
    void *arg;
} ucp_err_handler_t;

typedef struct {
    uint64_t field_mask;
    const ucp_address_t *address;
    ucp_err_handling_mode_t err_mode;
    ucp_err_handler_t err_handler;
    void *user_data;
    unsigned flags;
    ucs_sock_addr_t sockaddr;
    void *conn_request;
    const char *name;
    ucs_sock_addr_t local_sockaddr;
} ucp_ep_params_t;

typedef struct {
    uint64_t field_mask;
    void *address;
    size_t length;
    unsigned flags;
    unsigned prot;
    ucs_memory_type_t memory_type;
    const void *exported_memh_buffer;
} ucp_mem_map_params_t;

typedef struct {
    uint32_t op_attr_mask;
    uint32_t flags;
    void *request;
    void *cb;
    ucp_datatype_t datatype;
    void *user_data;
    void *reply_buffer;
    ucs_memory_type_t memory_type;
    size_t *recv_info;
    ucp_mem_h memh;
    ucp_datatype_t remote_datatype;
    const void *remote;
    size_t remote_count;
} ucp_request_param_t;

typedef struct {
    uint64_t field_mask;
    unsigned id;
    uint32_t flags;
    ucp_am_recv_callback_t cb;
    void *arg;
} ucp_am_handler_param_t;

typedef struct {
    uint64_t recv_attr;
    ucp_ep_h reply_ep;
} ucp_am_recv_param_t;

typedef struct {
    const char *transport_name;
    const char *device_name;
} ucp_transport_entry_t;

typedef struct {
    ucp_transport_entry_t *entries;
    unsigned num_entries;
    size_t entry_size;
} ucp_transports_t;

typedef struct {
    uint64_t field_mask;
    char name[32];
    kvx_sockaddr_storage_t local_sockaddr;
    kvx_sockaddr_storage_t remote_sockaddr;
    ucp_transports_t transports;
    void *user_data;
} ucp_ep_attr_t;

"""

# Functions, split from the types so that tests can check the type layouts against the real headers.
UCP_FUNCTIONS_CDEF = r"""
void ucp_get_version(unsigned *major_version, unsigned *minor_version, unsigned *release_number);
const char *ucs_status_string(ucs_status_t status);
ucs_status_t ucp_config_read(const char *env_prefix, const char *filename, ucp_config_t **config_p);
void ucp_config_release(ucp_config_t *config);
ucs_status_t ucp_init_version(unsigned api_major_version, unsigned api_minor_version,
                              const ucp_params_t *params, const ucp_config_t *config, ucp_context_h *context_p);
void ucp_cleanup(ucp_context_h context_p);

ucs_status_t ucp_worker_create(ucp_context_h context, const ucp_worker_params_t *params, ucp_worker_h *worker_p);
void ucp_worker_destroy(ucp_worker_h worker);
ucs_status_t ucp_worker_get_address(ucp_worker_h worker, ucp_address_t **address_p, size_t *address_length_p);
void ucp_worker_release_address(ucp_worker_h worker, ucp_address_t *address);
unsigned ucp_worker_progress(ucp_worker_h worker);
ucs_status_t ucp_worker_get_efd(ucp_worker_h worker, int *fd);
ucs_status_t ucp_worker_arm(ucp_worker_h worker);
ucs_status_t ucp_worker_signal(ucp_worker_h worker);
ucs_status_t ucp_worker_set_am_recv_handler(ucp_worker_h worker, const ucp_am_handler_param_t *param);

ucs_status_t ucp_ep_create(ucp_worker_h worker, const ucp_ep_params_t *params, ucp_ep_h *ep_p);
uintptr_t ucp_ep_close_nbx(ucp_ep_h ep, const ucp_request_param_t *param);
uintptr_t ucp_ep_flush_nbx(ucp_ep_h ep, const ucp_request_param_t *param);
ucs_status_t ucp_ep_query(ucp_ep_h ep, ucp_ep_attr_t *attr);

ucs_status_t ucp_mem_map(ucp_context_h context, const ucp_mem_map_params_t *params, ucp_mem_h *memh_p);
ucs_status_t ucp_mem_unmap(ucp_context_h context, ucp_mem_h memh);
ucs_status_t ucp_rkey_pack(ucp_context_h context, ucp_mem_h memh, void **rkey_buffer_p, size_t *size_p);
void ucp_rkey_buffer_release(void *rkey_buffer);
ucs_status_t ucp_ep_rkey_unpack(ucp_ep_h ep, const void *rkey_buffer, ucp_rkey_h *rkey_p);
void ucp_rkey_destroy(ucp_rkey_h rkey);

uintptr_t ucp_put_nbx(ucp_ep_h ep, uintptr_t buffer, size_t count, uint64_t remote_addr, ucp_rkey_h rkey,
                      const ucp_request_param_t *param);
uintptr_t ucp_get_nbx(ucp_ep_h ep, uintptr_t buffer, size_t count, uint64_t remote_addr, ucp_rkey_h rkey,
                      const ucp_request_param_t *param);
uintptr_t ucp_am_send_nbx(ucp_ep_h ep, unsigned id, const void *header, size_t header_length,
                          uintptr_t buffer, size_t count, const ucp_request_param_t *param);
uintptr_t ucp_am_recv_data_nbx(ucp_worker_h worker, void *data_desc, uintptr_t buffer, size_t count,
                               const ucp_request_param_t *param);
void ucp_am_data_release(ucp_worker_h worker, void *data);

ucs_status_t ucp_request_check_status(uintptr_t request);
void ucp_request_cancel(ucp_worker_h worker, uintptr_t request);
void ucp_request_free(uintptr_t request);
"""

UCP_CDEF = UCP_TYPES_CDEF + UCP_FUNCTIONS_CDEF

# libc: cross-memory attach (one call moves up to 1024 iovecs on each side) and memmove for odd-sized copies.
LIBC_CDEF = r"""
struct iovec { void *iov_base; size_t iov_len; };
ssize_t process_vm_readv(int pid, const struct iovec *local_iov, unsigned long liovcnt,
                         const struct iovec *remote_iov, unsigned long riovcnt, unsigned long flags);
ssize_t process_vm_writev(int pid, const struct iovec *local_iov, unsigned long liovcnt,
                          const struct iovec *remote_iov, unsigned long riovcnt, unsigned long flags);
"""

# Constants from ucp.h / ucp_def.h (UCX 1.22); UCX never renumbers them.
UCP_PARAM_FIELD_FEATURES = 1 << 0
UCP_PARAM_FIELD_MT_WORKERS_SHARED = 1 << 5
UCP_PARAM_FIELD_NAME = 1 << 8
UCP_FEATURE_RMA = 1 << 1
UCP_FEATURE_WAKEUP = 1 << 4
UCP_FEATURE_AM = 1 << 6
UCP_WORKER_PARAM_FIELD_THREAD_MODE = 1 << 0
UCP_WORKER_PARAM_FIELD_EVENTS = 1 << 2
UCP_WORKER_PARAM_FIELD_NAME = 1 << 6
UCP_WAKEUP_RMA = 1 << 0
UCP_WAKEUP_TX = 1 << 10
UCP_WAKEUP_RX = 1 << 11
UCS_THREAD_MODE_SERIALIZED = 1
UCP_EP_PARAM_FIELD_REMOTE_ADDRESS = 1 << 0
UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE = 1 << 1
UCP_EP_PARAM_FIELD_ERR_HANDLER = 1 << 2
UCP_EP_PARAM_FIELD_NAME = 1 << 7
UCP_ERR_HANDLING_MODE_NONE = 0
UCP_ERR_HANDLING_MODE_PEER = 1
UCP_EP_CLOSE_FLAG_FORCE = 1 << 0
UCP_MEM_MAP_PARAM_FIELD_ADDRESS = 1 << 0
UCP_MEM_MAP_PARAM_FIELD_LENGTH = 1 << 1
UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE = 1 << 4
UCS_MEMORY_TYPE_HOST = 0
UCS_MEMORY_TYPE_CUDA = 1
UCP_OP_ATTR_FIELD_REQUEST = 1 << 0
UCP_OP_ATTR_FIELD_CALLBACK = 1 << 1
UCP_OP_ATTR_FIELD_FLAGS = 1 << 4
UCP_OP_ATTR_FIELD_MEMORY_TYPE = 1 << 6
UCP_OP_ATTR_FIELD_MEMH = 1 << 8
UCP_AM_HANDLER_PARAM_FIELD_ID = 1 << 0
UCP_AM_HANDLER_PARAM_FIELD_FLAGS = 1 << 1
UCP_AM_HANDLER_PARAM_FIELD_CB = 1 << 2
UCP_AM_HANDLER_PARAM_FIELD_ARG = 1 << 3
UCP_AM_FLAG_WHOLE_MSG = 1 << 0
UCP_AM_SEND_FLAG_REPLY = 1 << 0
UCP_AM_SEND_FLAG_COPY_HEADER = 1 << 3
UCP_AM_RECV_ATTR_FIELD_REPLY_EP = 1 << 0
UCP_AM_RECV_ATTR_FLAG_DATA = 1 << 16
UCP_AM_RECV_ATTR_FLAG_RNDV = 1 << 17
UCP_EP_ATTR_FIELD_TRANSPORTS = 1 << 3

UCS_OK = 0
UCS_INPROGRESS = 1
UCS_ERR_BUSY = -15
UCS_ERR_CANCELED = -16
UCS_ERR_NOT_CONNECTED = -24
UCS_ERR_LAST = -100
