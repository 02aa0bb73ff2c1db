/* The capture pump (docs/fastpath.md step 3a): the declarations; also cffi's cdef.
 *
 * One rp_pump holds what a wake-up's common packet needs from the port and the relay: the
 * link layer, the local addresses, the last frame seen (the bridge duplicate check), the
 * flow table (key L or R -> peer address, mux link, mux session, tag C), each mux link's
 * budget and output buffer for the pump call, and the counters Python folds into its own
 * after every pump call.  rp_pump_frame is GREPort._frameReceived for one frame; the pcap
 * callback and the tests (frames from Python) both call it.
 *
 * Links: a small index (0 .. RP_MAX_LINKS-1) per mux connection, which Python assigns
 * (routeproxy.flows.FlowTable) and reuses once none of the flows names it.  A pump call
 * frames for every link begun for it (rp_pump_begin_link), each into its own buffer within
 * its own budget; a frame of a link not begun is handed back (RP_BACK_NO_LINK).
 */

/* rp_pump_frame's results */
#define RP_PUMP_TAKEN 0       /* handled here: framed, dropped or counted */
#define RP_PUMP_HAND_BACK 1   /* Python must run it through GREPort._frameReceived */

/* why a frame was handed back (rp_pump.back_reason; the tests and the status read them) */
#define RP_BACK_SOJOURN 1     /* older than drop_before, no gate in C: Python's gate drops it */
#define RP_BACK_FRAGMENT 2
#define RP_BACK_MALFORMED 3   /* rp_split_gre refused it: the demux counts it */
#define RP_BACK_UNKNOWN_KEY 4
#define RP_BACK_WRONG_SOURCE 5
#define RP_BACK_BUDGET 6      /* over the byte budget while Python may still ask the link */
#define RP_BACK_NO_ROOM 7     /* the link's output buffer is full */
#define RP_BACK_NO_LINK 8     /* the flow's link was not begun for this call */

/* Frames of no call (a key with no entry here nor in Python, a source not the entry's,
 * malformed GRE): the Python path drops each, by its own reason, and logs it.  A flood of
 * them handed back one by one would cost a Python turn each, so C hands back at most
 * RP_PUNT_BURST (or what rp_pump_set_punt says: --gre-no-call-share) per RP_PUNT_WINDOW_MS of
 * capture time (per pump call without timestamps) and drops the rest itself
 * (rp_counts.no_call). */
#define RP_PUNT_BURST 32
#define RP_PUNT_WINDOW_MS 50

#define RP_FLOW_KEYS 65536
#define RP_MAX_LINKS 64       /* mux links framed in C; a flow of any other stays in Python */

struct rp_counts {
    uint64_t received;     /* frames taken (handed-back ones Python counts itself) */
    uint64_t delivered;    /* frames of flow entries: greReceived in the Python path */
    uint64_t duplicates;
    uint64_t not_ipv4;
    uint64_t truncated;
    uint64_t bad_header;
    uint64_t not_gre;
    uint64_t not_local;
    uint64_t sojourn;      /* older than drop_before: dropped by the gate in C */
    uint64_t no_call;      /* of no call, over RP_PUNT_BURST: dropped here */
    uint64_t handed_back;
    uint32_t links;        /* links with frames from the last pump call (rp_pump_out's i) */
};

struct rp_flow_delta {
    uint32_t key;
    uint32_t packets;      /* from the client: greIn, call.gre_in */
    uint64_t bytes;        /* their payload bytes: call.bytes_in */
    uint32_t dropped;      /* over the byte budget: the mux's watermark (or paused) drop */
    uint32_t too_large;    /* longer than the link's maxOutPayload allows */
    uint32_t link;         /* the flow's link when it was counted */
};

struct rp_pump;

struct rp_pump *rp_pump_new(size_t out_capacity);
void rp_pump_free(struct rp_pump *p);

/* The link layer (capture.LINK_LAYERS): type_at < 0 when it has no protocol field. */
int rp_pump_set_link(struct rp_pump *p, size_t link_length, long type_at,
                     const uint8_t *type_value, size_t type_length);
/* The local addresses, 4 bytes each, n of them (any number): -1 if out of memory. */
int rp_pump_set_local(struct rp_pump *p, const uint8_t *addresses, size_t n);
/* A flow entry for key (the call's local ID: L on the LRP, R on the RRP) on link (an index
 * below RP_MAX_LINKS: -1 otherwise), or its removal. */
int rp_pump_set_flow(struct rp_pump *p, uint32_t key, const uint8_t *src, uint32_t session,
                     uint32_t tag, uint32_t link);
void rp_pump_clear_flow(struct rp_pump *p, uint32_t key);
/* Python holds an entry for key (in C or not): its frames are never taken for no call's. */
void rp_pump_hold(struct rp_pump *p, uint32_t key, int held);
/* Frames of no call handed back per window (RP_PUNT_BURST until set; 0: none). */
void rp_pump_set_punt(struct rp_pump *p, uint32_t frames);

struct rp_gate;   /* sojourn.h */

/* Before a pump call: the sojourn gate's threshold (0: none) and the gate (NULL: Python's,
 * each frame older than the threshold is handed back; else C drops it, counted, and asks
 * the gate for the next threshold: rp_pump_drop_before); no link is begun.  Then per
 * link that may get frames: its byte budget (the GRE watermark's room), whether a frame
 * over it is handed back (Python has not asked the link yet) rather than dropped, and the
 * link's largest payload; -1 for a bad index or without memory for its buffer (its flows'
 * frames are then handed back). */
void rp_pump_begin(struct rp_pump *p, double drop_before, struct rp_gate *gate);
double rp_pump_drop_before(struct rp_pump *p);
int rp_pump_begin_link(struct rp_pump *p, uint32_t link, int64_t room, int hand_back_over,
                       int64_t max_payload);
/* One frame (GREPort._frameReceived): RP_PUMP_TAKEN or RP_PUMP_HAND_BACK. */
int rp_pump_frame(struct rp_pump *p, const uint8_t *frame, size_t size, double ts, int has_ts);
/* The frame the last call handed back with RP_BACK_NO_LINK, once its link is begun: the
 * same, without the duplicate check it passed then (it is still the last frame). */
int rp_pump_frame_again(struct rp_pump *p, const uint8_t *frame, size_t size, double ts,
                        int has_ts);

/* What the pump call produced: the i-th link with frames (i < rp_counts.links, in the order
 * of their first frame: NULL past them), its mux frames in capture order; and the head of
 * the capture queue. */
const uint8_t *rp_pump_out(struct rp_pump *p, uint32_t i, uint32_t *link, size_t *length,
                           uint32_t *frames);
int rp_pump_head(struct rp_pump *p, double *head);
int rp_pump_back_reason(struct rp_pump *p);
/* The link of the flow whose frame was handed back with RP_BACK_NO_LINK (else -1): Python
 * begins it and gives the frame again (rp_pump_frame_again) before any other. */
int rp_pump_back_link(struct rp_pump *p);
/* The counters since the last take, zeroed by it; deltas of at most max entries (the rest
 * on the next call: the return says how many were written). */
void rp_pump_take_counts(struct rp_pump *p, struct rp_counts *out);
size_t rp_pump_take_deltas(struct rp_pump *p, struct rp_flow_delta *out, size_t max);
/* Frames of flow entries taken since the last take (the loop's test for a link's frame). */
uint64_t rp_pump_delivered(struct rp_pump *p);

/* libpcap: a handle opened here, read with the pump.  Errors as text in err (256 bytes). */
struct rp_pcap;
struct rp_pcap *rp_pcap_open(const char *device, int snaplen, int buffer_size,
                             const char *filter, char *err);
int rp_pcap_set_filter(struct rp_pcap *c, const char *filter, char *err);
int rp_pcap_fileno(struct rp_pcap *c);
int rp_pcap_datalink(struct rp_pcap *c);
int rp_pcap_stats(struct rp_pcap *c, uint64_t *received, uint64_t *dropped, uint64_t *ifdropped);
void rp_pcap_close(struct rp_pcap *c);
/* Up to budget frames through rp_pump_frame; stops after a hand-back (pcap_breakloop), whose
 * frame and timestamp are then *back, *back_length, *back_ts.  Frames read, or -1 (err). */
int rp_pcap_pump(struct rp_pcap *c, struct rp_pump *p, int budget, const uint8_t **back,
                 size_t *back_length, double *back_ts, char *err);

/* The link's TLS write in C (docs/fastpath.md step 3b): a wake-up's mux frames SSL_write'n
 * into the link's own SSL* (pyOpenSSL's, through its SSL_write and BIO_read, whose addresses
 * Python passes), the records read from its write BIO and sent on the TCP socket at once.
 * Only from the reactor's thread, inside a turn in which Python checked the link alive and
 * idle (routeproxy.mux.linksocket.NativeTLSWriter). */
#define RP_TLS_SENT 0           /* every byte taken by SSL_write (the rest of the records, if
                                 * any, in *rest for Python to queue) */
#define RP_TLS_WRITE_FAILED -1  /* SSL_write refused some: *taken bytes were (their records
                                 * are in *rest or sent), the others take the Python path */
#define RP_TLS_NO_MEMORY -2

struct rp_tls;
struct rp_tls *rp_tls_new(uintptr_t ssl, uintptr_t write_bio, uintptr_t ssl_write,
                          uintptr_t bio_read, int fd);
void rp_tls_free(struct rp_tls *t);
/* data[0:length] through SSL_write, the write BIO's records through send(); what send() did
 * not take (EAGAIN, a short send, an error: *send_errno) is *rest[0:*rest_length], valid
 * until the next rp_tls_send of any link (one buffer per process). */
int rp_tls_send(struct rp_tls *t, const uint8_t *data, size_t length, size_t *taken,
                const uint8_t **rest, size_t *rest_length, int *send_errno);
