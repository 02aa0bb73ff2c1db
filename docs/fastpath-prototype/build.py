"""EXPERIMENT: a native LRP data-plane loop (c2s GRE only), to measure a wake-up outside Python."""
from cffi import FFI
ffi = FFI()
ffi.cdef("""
void plane_lock(void);
void plane_unlock(void);
void plane_set(int key, uint32_t src, uint32_t sid, int tag);
int plane_start(const char *iface, const char *bpf, uintptr_t ssl, uintptr_t wbio,
                uintptr_t sslWrite, uintptr_t bioRead, int fd);
void plane_stop(void);
uint64_t plane_count(int which);
int plane_open(const char *iface, const char *bpf, uintptr_t ssl, uintptr_t wbio,
               uintptr_t sslWrite, uintptr_t bioRead, int fd);
int plane_pump(void);
""")
ffi.set_source("_lrpplane", r"""
#include <pcap/pcap.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>

typedef int (*ssl_write_t)(void *, const void *, int);
typedef int (*bio_read_t)(void *, void *, int);

static pthread_mutex_t tls_lock = PTHREAD_MUTEX_INITIALIZER;
void plane_lock(void) { pthread_mutex_lock(&tls_lock); }
void plane_unlock(void) { pthread_mutex_unlock(&tls_lock); }

struct entry { uint32_t src; uint32_t sid; uint16_t tag; int used; };
static struct entry table[65536];
void plane_set(int key, uint32_t src, uint32_t sid, int tag) {
    table[key & 0xffff].src = src; table[key & 0xffff].sid = sid;
    table[key & 0xffff].tag = (uint16_t)tag; table[key & 0xffff].used = 1;
}

static struct {
    pcap_t *p; int linkoff; void *ssl; void *wbio; ssl_write_t sw; bio_read_t br; int fd;
    volatile int stop; pthread_t thread;
    uint64_t handled, slow, wakeups, writes;
    unsigned char buf[1 << 20]; int n;
    unsigned char out[1 << 21];
} P;

uint64_t plane_count(int which) {
    return which == 0 ? P.handled : which == 1 ? P.slow : which == 2 ? P.wakeups : P.writes;
}

static void put16(unsigned char *b, uint16_t v) { b[0] = v >> 8; b[1] = v; }
static void put32(unsigned char *b, uint32_t v) { b[0] = v >> 24; b[1] = v >> 16; b[2] = v >> 8; b[3] = v; }

static void cb(u_char *user, const struct pcap_pkthdr *h, const u_char *d) {
    int off = P.linkoff;
    if ((int)h->caplen < off + 20) { P.slow++; return; }
    const u_char *ip = d + off;
    int ihl = (ip[0] & 15) * 4, total = ip[2] << 8 | ip[3];
    if ((ip[0] >> 4) != 4 || ip[9] != 47 || ((ip[6] << 8 | ip[7]) & 0x3fff) || off + total > (int)h->caplen
        || total < ihl + 8) { P.slow++; return; }
    const u_char *g = ip + ihl;
    int flags = g[0] << 8 | g[1], key = g[6] << 8 | g[7];
    uint32_t src; memcpy(&src, ip + 12, 4);
    struct entry *e = &table[key];
    if (!e->used || e->src != src) { P.slow++; return; }
    int o = 8; int hasSeq = flags & 0x1000, hasAck = flags & 0x0080;
    uint32_t seq = 0, ack = 0;
    if (hasSeq) { seq = (uint32_t)g[o] << 24 | g[o+1] << 16 | g[o+2] << 8 | g[o+3]; o += 4; }
    if (hasAck) { ack = (uint32_t)g[o] << 24 | g[o+1] << 16 | g[o+2] << 8 | g[o+3]; o += 4; }
    int plen = total - ihl - o;
    if (plen < 0) { P.slow++; return; }
    int hl = 12 + 2 + (hasSeq ? 4 : 0) + (hasAck ? 4 : 0);
    if (P.n + hl + plen > (int)sizeof(P.buf)) { P.slow++; return; }
    unsigned char *b = P.buf + P.n;
    b[0] = 0x20; b[1] = (hasSeq ? 1 : 0) | (hasAck ? 2 : 0); put16(b + 2, 0);
    put32(b + 4, e->sid); put32(b + 8, plen + hl - 12); put16(b + 12, e->tag);
    int k = 14;
    if (hasSeq) { put32(b + k, seq); k += 4; }
    if (hasAck) { put32(b + k, ack); k += 4; }
    memcpy(b + k, g + o, plen);
    P.n += hl + plen; P.handled++;
}

static void sendall(const unsigned char *b, int n) {
    while (n > 0) {
        ssize_t s = send(P.fd, b, n, MSG_NOSIGNAL);
        if (s < 0) {
            if (errno == EAGAIN || errno == EINTR) { struct pollfd pf = {P.fd, POLLOUT, 0}; poll(&pf, 1, 100); continue; }
            return;
        }
        b += s; n -= s;
    }
}

static int pump_once(int locked) {
    P.wakeups++;
    P.n = 0;
    pcap_dispatch(P.p, 512, cb, NULL);
    if (!P.n) return 0;
    if (locked) pthread_mutex_lock(&tls_lock);
    int done = 0;
    while (done < P.n) {
        int w = P.sw(P.ssl, P.buf + done, P.n - done);
        if (w <= 0) break;
        done += w;
    }
    int m;
    while ((m = P.br(P.wbio, P.out, sizeof(P.out))) > 0) { sendall(P.out, m); P.writes++; }
    if (locked) pthread_mutex_unlock(&tls_lock);
    return P.n;
}

static void *loop(void *arg) {
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN}, got;
    ev.data.fd = pcap_get_selectable_fd(P.p);
    epoll_ctl(ep, EPOLL_CTL_ADD, ev.data.fd, &ev);
    while (!P.stop) {
        if (epoll_wait(ep, &got, 1, 200) > 0)
            pump_once(1);
    }
    return NULL;
}

int plane_open(const char *iface, const char *bpf, uintptr_t ssl, uintptr_t wbio,
               uintptr_t sslWrite, uintptr_t bioRead, int fd) {
    char err[PCAP_ERRBUF_SIZE];
    pcap_t *p = pcap_create(iface, err);
    if (!p) return -1;
    pcap_set_snaplen(p, 2048); pcap_set_immediate_mode(p, 1); pcap_set_buffer_size(p, 8 << 20);
    if (pcap_activate(p) < 0) return -2;
    struct bpf_program prog;
    if (pcap_compile(p, &prog, bpf, 1, PCAP_NETMASK_UNKNOWN) < 0 || pcap_setfilter(p, &prog) < 0) return -3;
    pcap_setdirection(p, PCAP_D_IN);
    pcap_setnonblock(p, 1, err);
    int dlt = pcap_datalink(p);
    P.linkoff = dlt == 113 ? 16 : dlt == 276 ? 20 : dlt == 1 ? 14 : 0;
    P.p = p; P.ssl = (void *)ssl; P.wbio = (void *)wbio; P.sw = (ssl_write_t)sslWrite;
    P.br = (bio_read_t)bioRead; P.fd = fd;
    return pcap_get_selectable_fd(p);
}

/* One wake-up from the reactor's thread (PLANE_MODE=pump): no lock, no thread. */
int plane_pump(void) { return pump_once(0); }

/* The thread (PLANE_MODE=thread): its own epoll on the handle; TLS under the lock. */
int plane_start(const char *iface, const char *bpf, uintptr_t ssl, uintptr_t wbio,
                uintptr_t sslWrite, uintptr_t bioRead, int fd) {
    if (plane_open(iface, bpf, ssl, wbio, sslWrite, bioRead, fd) < 0) return -1;
    P.stop = 0;
    return pthread_create(&P.thread, NULL, loop, NULL);
}

void plane_stop(void) { P.stop = 1; pthread_join(P.thread, NULL); }
""", libraries=["pcap", "pthread"])
ffi.compile(tmpdir=".", verbose=False)
