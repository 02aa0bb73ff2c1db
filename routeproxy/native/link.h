/* The link read (docs/fastpath.md steps 3a and 3b): the declarations; also cffi's cdef.
 *
 * One rp_link per mux connection.  rp_link_feed takes the link's decrypted bytes (what
 * Twisted's TLS hands MuxConnection.dataReceived; rp_link_read below decrypts them itself
 * and splits them the same way), splits them into mux frames, sends each
 * GRE frame (type 0x20) of a flow entry as enhanced GRE with the entry's key on the entry's
 * raw socket (queued, then one sendmmsg per socket: all sent before the call returns), and
 * hands every other frame back to Python's decoder, in order: it stops
 * before a frame it would send when frames for Python precede it (RP_LINK_MORE: Python
 * handles them, then calls again without data).  A trailing partial frame stays here.
 */

#define RP_LINK_DONE 0        /* every complete frame was sent or is in *out */
#define RP_LINK_MORE 1        /* *out first, then rp_link_feed(l, NULL, 0, ...) again */
#define RP_LINK_NO_MEMORY -1  /* nothing was taken: the link cannot go on */
#define RP_LINK_BATCH 64      /* GRE packets per sendmmsg at most (a call sends every one) */

struct rp_link_delta {
    uint32_t session;
    uint32_t tag;
    uint32_t packets;      /* GRE frames C took: framesIn, greIn, greOut, call.gre_out */
    uint32_t sent;         /* the port's sent */
    uint32_t busy;         /* the port's send_busy drops */
    uint32_t errors;       /* the port's send_error drops (last_errno: the last one's) */
    uint32_t aged;         /* GRE frames taken and not sent: read too old (the gate) */
    uint32_t header_written;   /* of sent, with C's IPv4 header (header_fd) */
    uint32_t header_refused;   /* refused by header_fd as too long, then given to fd (the
                                * entry's packets as long go to fd from then on) */
    uint64_t bytes;        /* their payload bytes: call.bytes_out */
    int last_errno;
};

struct rp_link;

struct rp_link *rp_link_new(void);
void rp_link_free(struct rp_link *l);
/* The entry for (mux session, call tag C): GRE goes to dst (4 bytes) on fd, keyed key (S).
 * With header_fd >= 0 (a raw IPPROTO_RAW socket bound to fd's address), C writes the IPv4
 * header itself (DF clear, ttl) and sends there: the kernel then copies the packet without
 * summing it, as it does on fd; what that socket refuses as over its device's MTU goes on
 * fd, which fragments it, as do its packets as long after it.  0, or -1 (no memory: the call stays on the Python path). */
int rp_link_set_flow(struct rp_link *l, uint32_t session, uint32_t tag, int fd, int header_fd,
                     int ttl, const uint8_t *dst, uint32_t key);
void rp_link_clear_flow(struct rp_link *l, uint32_t session, uint32_t tag);
size_t rp_link_flows(struct rp_link *l);
/* data[0:length] (may be NULL, 0) after what is held; frames longer than max_payload make the
 * link fail here as in Python: that header and every later byte go to *out as they are. */
int rp_link_feed(struct rp_link *l, const uint8_t *data, size_t length, uint32_t max_payload,
                 const uint8_t **out, size_t *out_length);
size_t rp_link_buffered(struct rp_link *l);
/* The entries' counters since the last take, zeroed by it (at most max: the rest next time). */
size_t rp_link_take_deltas(struct rp_link *l, struct rp_link_delta *out, size_t max);
/* sendmmsg calls made so far, all links (the tests' and the benchmarks' count). */
uint64_t rp_link_send_calls(void);

/* The link's TLS read in C (docs/fastpath.md step 3b): one readable wake-up of the link's
 * socket in one call.  recv() once (Twisted's read size), BIO_write into the SSL's read BIO,
 * SSL_read until WANT_READ straight into the held bytes above, the frames split as
 * rp_link_feed splits them.  Through pyOpenSSL's own SSL* and BIOs and the addresses of its
 * SSL_read, SSL_get_error, BIO_write, BIO_get_mem_data, which Python passes.  Only from the
 * reactor's thread, inside a turn in which Python checked the link alive and idle
 * (routeproxy.mux.linksocket.NativeTLSReader).  Everything unusual is Twisted's: */
#define RP_READ_AGAIN 1         /* *out first (frames for Python), then call again without recv:
                                 * no record was read after the one that completed them */
#define RP_READ_EOF 2           /* recv() returned 0: nothing else was done */
#define RP_READ_SOCKET_ERROR 4  /* recv() failed (info->error): nothing else was done */
#define RP_READ_SSL_ERROR 8     /* SSL_read failed otherwise than WANT_READ (close_notify, an
                                 * alert, a bad record: info->ssl_result); OpenSSL's error queue
                                 * is left as it is, so Twisted's own read meets the same */
#define RP_READ_TLS_OUT 16      /* the write BIO holds bytes (post-handshake messages): to send */
#define RP_READ_NO_MEMORY 32    /* the link cannot go on */

struct rp_read_info {
    size_t received;      /* ciphertext bytes recv() took */
    size_t plaintext;     /* plaintext bytes SSL_read gave (MuxStats.bytesIn) */
    int ssl_result;       /* SSL_read's result, with RP_READ_SSL_ERROR */
    int error;            /* recv()'s errno, with RP_READ_SOCKET_ERROR */
    double received_at;   /* the kernel's receive time of the last bytes the wake-up's recv()
                           * took (SO_TIMESTAMPNS, wall clock); 0: unknown */
    int clock_read;       /* 1: the read asked the clock (the gate needed it) */
};

struct rp_tls_in;
struct rp_tls_in *rp_tls_in_new(uintptr_t ssl, uintptr_t read_bio, uintptr_t write_bio,
                                uintptr_t ssl_read, uintptr_t ssl_get_error, uintptr_t bio_write,
                                uintptr_t bio_get_mem_data, int fd, size_t recv_size);
void rp_tls_in_free(struct rp_tls_in *t);
/* One wake-up (do_recv 1, at wall-clock time now, or 0: the clock is read here when the
 * gate needs it) or its continuation after RP_READ_AGAIN (do_recv 0): RP_READ_*
 * flags.  *out (valid until the next call on l) as rp_link_feed's.  With first_record it
 * also returns (RP_READ_AGAIN) after the first record that gives plaintext: Python has
 * output of its own queued, which Twisted's read would write before the next record. */
int rp_link_read(struct rp_link *l, struct rp_tls_in *t, int do_recv, int first_record,
                 uint32_t max_payload, const uint8_t **out, size_t *out_length,
                 struct rp_read_info *info, double now);
/* The link's sojourn gate (sojourn.h; docs/gre-io.md): a read's age is now minus the
 * receive time of its bytes (info->received_at: the socket needs SO_TIMESTAMPNS), and a read
 * that emptied the socket's queue is young (CoDel: an empty queue stands no more); once reads
 * stay older than target for an interval, GRE frames C would send are dropped instead (the
 * entries' aged), as CoDel's control law says.  Target 0 (the default): no gate. */
void rp_link_set_gate(struct rp_link *l, double target, double interval);
const struct rp_gate *rp_link_gate(struct rp_link *l);
