/* routeproxy's native per-packet functions: the declarations.
 *
 * This file is also cffi's cdef (routeproxy/native/build.py reads it as is), so it holds only
 * what cdef parses: no #include, no include guard, integer #defines only.  gre.c includes
 * <stddef.h> and <stdint.h> before it.
 *
 * Each function is the C twin of a Python reference (named at each) and must behave the same
 * on every input: tests/unit/test_native_gre.py checks it differentially.  None allocates,
 * none keeps state, every read is checked against the buffer's length.
 */

/* Errors of rp_split_gre and rp_build_gre: one per GREError reason of routeproxy.gre. */
#define RP_GRE_TRUNCATED -1
#define RP_GRE_NOT_VERSION_1 -2
#define RP_GRE_CHECKSUM_ROUTING -3
#define RP_GRE_KEY_MISSING -4
#define RP_GRE_SOURCE_ROUTE_RECURSION -5
#define RP_GRE_RESERVED_FLAGS -6
#define RP_GRE_NOT_PPP -7
#define RP_GRE_PAYLOAD_TRUNCATED -8
#define RP_GRE_PAYLOAD_WITHOUT_SEQUENCE -9
/* A field does not fit its width (Python: struct.error). */
#define RP_RANGE -10
/* The output buffer is too small (no Python twin: the caller sizes it). */
#define RP_NO_ROOM -11

/* Largest headers the builders write: callers size their output buffers with these. */
#define RP_GRE_HEADER_MAX 16
#define RP_MUX_GRE_HEAD_MAX 22

/* rp_ipv4_gre's results.  The first three carry the GRE bytes' place; the port decides
 * what follows (RP_IPV4_EMPTY is counted "truncated", but only after the port's
 * local-address check, as routeproxy.greport does). */
#define RP_IPV4_GRE 0
#define RP_IPV4_FRAGMENT 1
#define RP_IPV4_EMPTY 2
#define RP_IPV4_NOT_IPV4 -1
#define RP_IPV4_TRUNCATED -2
#define RP_IPV4_BAD_HEADER -3
#define RP_IPV4_NOT_GRE -4

struct rp_gre {
    uint16_t call_id;
    uint8_t has_seq;
    uint8_t has_ack;
    uint32_t seq;
    uint32_t ack;
    size_t payload_offset;
    size_t payload_length;
};

struct rp_ipv4 {
    size_t gre_offset;   /* the IP payload: GRE, or a fragment of it */
    size_t gre_length;
    uint8_t src[4];
    uint8_t dst[4];
    uint16_t total;      /* the IP total length */
    uint16_t ident;
    uint16_t fragment;   /* flags + fragment offset, as on the wire */
    uint16_t checksum;
};

/* routeproxy.gre.split_gre: 0 and *out filled, or an RP_GRE_* error. */
int rp_split_gre(const uint8_t *data, size_t size, struct rp_gre *out);

/* routeproxy.gre.build_gre(call_id, payload, seq, ack): the packet's length, written to out,
 * or RP_GRE_PAYLOAD_WITHOUT_SEQUENCE, RP_RANGE or RP_NO_ROOM. */
long rp_build_gre(uint8_t *out, size_t room, int64_t call_id, const uint8_t *payload,
                  size_t length, int has_seq, int64_t seq, int has_ack, int64_t ack);

/* routeproxy.mux.frames.encodeGREHead(session, call_tag, seq, ack, length) + data: the
 * frame's length, written to out, or RP_RANGE or RP_NO_ROOM. */
long rp_mux_gre_frame(uint8_t *out, size_t room, int64_t session, int64_t call_tag,
                      int has_seq, int64_t seq, int has_ack, int64_t ack,
                      const uint8_t *data, size_t length);

/* The stateless IPv4 checks of routeproxy.greport.GREPort._frameReceived on a captured frame
 * whose link header is link_length bytes; type_at < 0 when the link layer has no protocol
 * field, else type_length bytes there must equal type_value.  An RP_IPV4_* result. */
int rp_ipv4_gre(const uint8_t *frame, size_t size, size_t link_length, long type_at,
                const uint8_t *type_value, size_t type_length, struct rp_ipv4 *out);

/* A digest of gre.h and gre.c as built, so that load() can refuse a stale module. */
const char *rp_source_digest(void);
