"""EXPERIMENT: the RRP's receive side in one C call per link-socket wake-up (PLANE 'pump').

recv() the link socket -> BIO_write into pyOpenSSL's read BIO -> SSL_read loop -> mux frames;
GRE frames of a learned (session, tag) are rebuilt as enhanced GRE and sendmsg()ed on the
raw socket; every other frame is handed to Python (in order) through an output buffer.
All OpenSSL calls go through function pointers of cryptography's embedded OpenSSL."""
from cffi import FFI
ffi = FFI()
ffi.cdef("""
int rrp_open(int fd, uintptr_t ssl, uintptr_t rbio, uintptr_t wbio, uintptr_t sslRead,
             uintptr_t sslGetError, uintptr_t bioWrite, uintptr_t bioRead, uint32_t maxPayload);
int rrp_set(uint32_t sid, int tag, int sockfd, uint32_t dst, int key);
void rrp_del_sid(uint32_t sid);
void rrp_del(uint32_t sid, int tag);
int rrp_pump(int doRecv);
unsigned char *rrp_out(int *len);
void rrp_out_clear(void);
unsigned char *rrp_tls_out(int *len);
unsigned char *rrp_take_pending(int *len);
int rrp_errno(void);
uint64_t rrp_count(int which);
uint64_t rrp_entry_count(int idx, int which);
""")
ffi.set_source("_rrppump", r"""
#include <sys/socket.h>
#include <sys/uio.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <stdlib.h>

typedef int (*ssl_read_t)(void *, void *, int);
typedef int (*ssl_get_error_t)(const void *, int);
typedef int (*bio_write_t)(void *, const void *, int);
typedef int (*bio_read_t)(void *, void *, int);

#define F_OUT      1    /* out buffer holds frames for Python; call rrp_pump(0) after   */
#define F_EOF      2    /* recv() returned 0                                            */
#define F_SOCKERR  4    /* recv() failed (rrp_errno)                                    */
#define F_SSLERR   8    /* SSL_read failed other than WANT_READ: Python re-runs it       */
#define F_TLSOUT  16    /* the write BIO had bytes (rrp_tls_out): Python writes them    */
#define F_FALLBACK 32   /* a frame C will not buffer: Python takes the rest (rrp_take_pending) */
#define F_MORE    64    /* parsing stopped early (order): call rrp_pump(0) after the out frames */

#define TBL 4096
struct entry { uint32_t sid; uint16_t tag; uint16_t key; int fd; struct sockaddr_in dst; int used;
               uint64_t pkts, bytes; };
static struct entry table[TBL];

#define PT_CAP (4 << 20)
#define RB_CAP (256 << 10)
#define OUT_CAP (4 << 20)
static struct {
    int fd; void *ssl, *rbio, *wbio; ssl_read_t sr; ssl_get_error_t ge; bio_write_t bw; bio_read_t br;
    uint32_t maxPayload; int err;
    unsigned char *pt; int ptStart, ptEnd;          /* plaintext not yet parsed */
    unsigned char *out; int outLen;                 /* frames for Python */
    unsigned char rb[RB_CAP];
    unsigned char tls[1 << 16]; int tlsLen;
    uint64_t c[12];
} P;
/* counters: 0 wakeups, 1 pump calls, 2 bytes recv'd, 3 recv calls, 4 SSL_read calls,
   5 GRE sent by C, 6 frames to Python, 7 send busy drops, 8 send errors, 9 GRE to Python (unknown flow),
   10 fallback, 11 plaintext bytes */

static inline uint32_t hash(uint32_t sid, uint16_t tag) { return ((sid * 2654435761u) ^ (tag * 40503u)) & (TBL - 1); }
static struct entry *lookup(uint32_t sid, uint16_t tag) {
    uint32_t h = hash(sid, tag);
    for (int i = 0; i < TBL; i++) {
        struct entry *e = &table[(h + i) & (TBL - 1)];
        if (!e->used) return NULL;
        if (e->used == 1 && e->sid == sid && e->tag == tag) return e;
    }
    return NULL;
}
int rrp_set(uint32_t sid, int tag, int sockfd, uint32_t dst, int key) {
    struct entry *e = lookup(sid, (uint16_t)tag);
    if (!e) {
        uint32_t h = hash(sid, (uint16_t)tag);
        for (int i = 0; i < TBL; i++) {
            e = &table[(h + i) & (TBL - 1)];
            if (e->used != 1) break;
        }
        if (e->used == 1) return -1;
        e->pkts = e->bytes = 0;
    }
    e->sid = sid; e->tag = (uint16_t)tag; e->key = (uint16_t)key; e->fd = sockfd;
    memset(&e->dst, 0, sizeof e->dst);
    e->dst.sin_family = AF_INET; e->dst.sin_addr.s_addr = dst;   /* network order */
    e->used = 1;
    return (int)(e - table);
}
void rrp_del(uint32_t sid, int tag) { struct entry *e = lookup(sid, (uint16_t)tag); if (e) e->used = 2; }
void rrp_del_sid(uint32_t sid) { for (int i = 0; i < TBL; i++) if (table[i].used == 1 && table[i].sid == sid) table[i].used = 2; }
uint64_t rrp_entry_count(int idx, int which) { return which ? table[idx].bytes : table[idx].pkts; }
uint64_t rrp_count(int which) { return P.c[which]; }
int rrp_errno(void) { return P.err; }

int rrp_open(int fd, uintptr_t ssl, uintptr_t rbio, uintptr_t wbio, uintptr_t sslRead,
             uintptr_t sslGetError, uintptr_t bioWrite, uintptr_t bioRead, uint32_t maxPayload) {
    if (!P.pt) { P.pt = malloc(PT_CAP); P.out = malloc(OUT_CAP); }
    if (!P.pt || !P.out) return -1;
    P.fd = fd; P.ssl = (void *)ssl; P.rbio = (void *)rbio; P.wbio = (void *)wbio;
    P.sr = (ssl_read_t)sslRead; P.ge = (ssl_get_error_t)sslGetError;
    P.bw = (bio_write_t)bioWrite; P.br = (bio_read_t)bioRead; P.maxPayload = maxPayload;
    P.ptStart = P.ptEnd = 0; P.outLen = 0; P.tlsLen = 0;
    return 0;
}
unsigned char *rrp_out(int *len) { *len = P.outLen; return P.out; }
void rrp_out_clear(void) { P.outLen = 0; }
unsigned char *rrp_tls_out(int *len) { *len = P.tlsLen; P.tlsLen = 0; return P.tls; }
unsigned char *rrp_take_pending(int *len) {
    *len = P.ptEnd - P.ptStart; unsigned char *p = P.pt + P.ptStart; P.ptStart = P.ptEnd = 0; return p;
}

static inline uint32_t get32(const unsigned char *b) { return (uint32_t)b[0] << 24 | b[1] << 16 | b[2] << 8 | b[3]; }
static inline void put16(unsigned char *b, uint16_t v) { b[0] = v >> 8; b[1] = v; }

/* A GRE frame's fast path: 1 if C sent (or dropped as busy) it, 0 if Python must have it. */
static int fastGRE(const unsigned char *h, uint32_t sid, uint32_t len) {
    int flags = h[1] & 3;
    uint32_t need = 2 + ((flags & 1) ? 4 : 0) + ((flags & 2) ? 4 : 0);
    if (sid == 0 || len < need) return 0;
    const unsigned char *p = h + 12;
    uint16_t tag = (uint16_t)(p[0] << 8 | p[1]);
    struct entry *e = lookup(sid, tag);
    if (!e) { P.c[9]++; return 0; }
    uint32_t plen = len - need;
    if (plen > 0xffff || (plen && !(flags & 1))) return 0;   /* Python raises/drops as it does */
    unsigned char g[16]; int gl = 8, o = 2;
    uint16_t fv = 0x2001 | ((flags & 1) ? 0x1000 : 0) | ((flags & 2) ? 0x0080 : 0);
    put16(g, fv); put16(g + 2, 0x880B); put16(g + 4, (uint16_t)plen); put16(g + 6, e->key);
    if (flags & 1) { memcpy(g + gl, p + o, 4); gl += 4; o += 4; }
    if (flags & 2) { memcpy(g + gl, p + o, 4); gl += 4; o += 4; }
    struct iovec iov[2] = {{g, gl}, {(void *)(p + o), plen}};
    struct msghdr m = {0};
    m.msg_name = &e->dst; m.msg_namelen = sizeof e->dst; m.msg_iov = iov; m.msg_iovlen = plen ? 2 : 1;
    if (sendmsg(e->fd, &m, 0) < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) P.c[7]++; else P.c[8]++;
    } else { P.c[5]++; e->pkts++; e->bytes += plen; }
    return 1;
}

/* Parse complete frames.  0: all parsed; F_OUT: stopped at a fast frame after frames for Python
   (so that Python sees them first); F_FALLBACK: a frame too large for C. */
static int parse(void) {
    while (P.ptEnd - P.ptStart >= 12) {
        unsigned char *h = P.pt + P.ptStart;
        uint32_t sid = get32(h + 4), len = get32(h + 8);
        if (len > P.maxPayload || len + 12 > PT_CAP / 2) return F_FALLBACK;
        if ((uint32_t)(P.ptEnd - P.ptStart) < 12 + len) break;
        if (h[0] == 0x20 && sid) {
            if (P.outLen) {
                /* keep order: a frame Python has not seen yet comes first */
                uint16_t tag = (uint16_t)(h[12] << 8 | h[13]);
                if (len >= 2 && lookup(sid, tag)) return F_OUT;
            }
            if (fastGRE(h, sid, len)) { P.ptStart += 12 + len; continue; }
        }
        if (P.outLen + 12 + len > OUT_CAP) return F_OUT;
        memcpy(P.out + P.outLen, h, 12 + len); P.outLen += 12 + len; P.c[6]++;
        P.ptStart += 12 + len;
    }
    if (P.ptStart == P.ptEnd) P.ptStart = P.ptEnd = 0;
    return 0;
}

int rrp_pump(int doRecv) {
    int flags = 0;
    P.c[1]++;
    if (doRecv) {
        P.c[0]++;
        int total = 0;
        while (total < (1 << 20)) {
            ssize_t n = recv(P.fd, P.rb, RB_CAP, 0);
            P.c[3]++;
            if (n > 0) {
                P.bw(P.rbio, P.rb, (int)n);   /* a memory BIO takes everything */
                total += n; P.c[2] += n;
                if (n < RB_CAP) break;        /* drained (saves the EAGAIN recv) */
                continue;
            }
            if (n == 0) { flags |= F_EOF; break; }
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) { P.err = errno; flags |= F_SOCKERR; }
            break;
        }
    }
    for (;;) {
        int r = parse();
        if (r) { flags |= r == F_OUT ? F_MORE : r; if (r == F_FALLBACK) P.c[10]++; break; }
        if (P.ptStart > 0 && PT_CAP - P.ptEnd < (1 << 16)) {
            memmove(P.pt, P.pt + P.ptStart, P.ptEnd - P.ptStart);
            P.ptEnd -= P.ptStart; P.ptStart = 0;
        }
        int room = PT_CAP - P.ptEnd;
        if (room > (1 << 16)) room = 1 << 16;
        int n = P.sr(P.ssl, P.pt + P.ptEnd, room);
        P.c[4]++;
        if (n <= 0) {
            int e = P.ge(P.ssl, n);
            if (e != 2 /* SSL_ERROR_WANT_READ */) flags |= F_SSLERR;
            break;
        }
        P.ptEnd += n; P.c[11] += n;
    }
    if (P.outLen) flags |= F_OUT;
    int m;
    while (P.tlsLen < (int)sizeof(P.tls) && (m = P.br(P.wbio, P.tls + P.tlsLen, sizeof(P.tls) - P.tlsLen)) > 0)
        P.tlsLen += m;
    if (P.tlsLen) flags |= F_TLSOUT;
    return flags;
}
""")
ffi.compile(tmpdir=".", verbose=False)
