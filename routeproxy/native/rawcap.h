/* The raw-socket capture (--gre-capture native-raw): the declarations; also cffi's cdef.
 *
 * An unbound raw IPPROTO_GRE socket read with recvmmsg, each packet through the capture
 * pump's rp_pump_frame (pump.h) with no link header (DLT_RAW).  The kernel has reassembled
 * IPv4 fragments before a raw socket sees them, and a bridge's second copy never reaches
 * one, so the common real-client packet (two fragments at PPP MTU 1500) is framed in C.
 * Each packet keeps its kernel receive time (SO_TIMESTAMPNS, wall clock as pcap's), so the
 * sojourn gate works; a shard's filter is attached in the kernel (SO_ATTACH_FILTER).
 */

struct rp_rawcap;
/* A socket whose packets are kept up to snaplen bytes, its receive buffer buffer_size
 * (0: the system's), GRE matching filter (a pcap expression on raw IPv4; "" or NULL: all).
 * Errors as text in err (256 bytes). */
struct rp_rawcap *rp_rawcap_open(int snaplen, int buffer_size, const char *filter, char *err);
int rp_rawcap_set_filter(struct rp_rawcap *c, const char *filter, char *err);
int rp_rawcap_fileno(struct rp_rawcap *c);
/* Packets read; packets the kernel dropped because the socket's buffer was full
 * (SO_RXQ_OVFL, as of the last packet read). */
void rp_rawcap_stats(struct rp_rawcap *c, uint64_t *received, uint64_t *dropped);
/* Packets read by recvmmsg but not yet through the pump (after a hand-back). */
int rp_rawcap_pending(struct rp_rawcap *c);
uint64_t rp_rawcap_reads(struct rp_rawcap *c);
void rp_rawcap_close(struct rp_rawcap *c);
/* rp_pcap_pump's contract: up to budget packets through rp_pump_frame (those pending first,
 * then recvmmsg batches of at most the budget left), stopping at the first one handed back,
 * which is then *back[0:*back_length] (valid until the next call) with its receive time
 * *back_ts (0: none).  Packets read, or -1 (err). */
int rp_rawcap_pump(struct rp_rawcap *c, struct rp_pump *p, int budget, const uint8_t **back,
                   size_t *back_length, double *back_ts, char *err);
