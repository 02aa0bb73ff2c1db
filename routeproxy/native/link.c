/* The link read (link.h; docs/fastpath.md steps 3a and 3b): mux frames -> GRE sends.
 * Compiled after gre.c and sojourn.c in one unit (build.py): rp_build_gre and get32 are
 * gre.c's, the gate's functions sojourn.c's. */
#include <errno.h>
#include <malloc.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <time.h>

#include "link.h"

/* Buffers used only inside one call, from the reactor's thread alone (link.h): one each per
 * process, not per link, so a link's C state is small (a per-link 64 KiB block, freed at
 * each link's end, left holes in the heap: the soak, docs/soak.md). */
#define RECV_MAX (256 * 1024)
static uint8_t recv_buffer[RECV_MAX];                /* one recv() of the link's socket */

#define LINK_HEADER 12
#define LINK_GRE 0x20

struct link_entry {
    uint32_t session, tag, key;
    int used;                       /* 0 empty, 1 used, 2 removed */
    int fd;
    int header_fd;                  /* C writes the IPv4 header (-1: fd builds it) */
    uint32_t header_limit;          /* packets this long or more go on fd (0: none learned) */
    uint8_t ttl;
    int dirty;
    struct sockaddr_in dst;
    struct rp_link_delta delta;
};

struct rp_link {
    uint8_t *buf;                   /* held bytes: buf[start:end] */
    size_t start, end, cap;
    int failed;                     /* a frame too large was seen: everything goes to Python */
    struct link_entry *table;
    size_t slots, used, removed;    /* slots: a power of two */
    size_t *dirty;                  /* entries with counts, by index */
    size_t ndirty;
    double received_at;             /* the last recv()'s receive time (0: unknown, Twisted's) */
    double drop_before;             /* the wake-up's gate threshold (0: none) */
    struct rp_gate gate;            /* the receive queue's sojourn gate (target 0: off) */
};

static size_t slot_of(uint32_t session, uint32_t tag, size_t slots) {
    return ((session * 2654435761u) ^ (tag * 40503u)) & (slots - 1);
}

static struct link_entry *find(struct rp_link *l, uint32_t session, uint32_t tag) {
    size_t mask = l->slots - 1, i = slot_of(session, tag, l->slots);
    for (size_t n = 0; n < l->slots; n++, i = (i + 1) & mask) {
        struct link_entry *e = &l->table[i];
        if (!e->used)
            return NULL;
        if (e->used == 1 && e->session == session && e->tag == tag)
            return e;
    }
    return NULL;
}

static int resize(struct rp_link *l, size_t slots) {
    struct link_entry *table = calloc(slots, sizeof *table);
    size_t *dirty = calloc(slots, sizeof *dirty);
    if (!table || !dirty) {
        free(table);
        free(dirty);
        return -1;
    }
    struct link_entry *old = l->table;
    size_t oldSlots = l->slots;
    l->table = table;
    l->slots = slots;
    l->removed = 0;
    free(l->dirty);
    l->dirty = dirty;
    l->ndirty = 0;
    for (size_t j = 0; j < oldSlots; j++) {
        if (old[j].used != 1)
            continue;
        size_t i = slot_of(old[j].session, old[j].tag, slots);
        while (table[i].used)
            i = (i + 1) & (slots - 1);
        table[i] = old[j];
        if (table[i].dirty)
            dirty[l->ndirty++] = i;
    }
    free(old);
    return 0;
}

struct rp_link *rp_link_new(void) {
    struct rp_link *l = calloc(1, sizeof *l);
    if (!l)
        return NULL;
    if (resize(l, 64) < 0) {
        free(l);
        return NULL;
    }
    return l;
}

/* A link's C state (its held bytes and flow table) is freed when the link goes; glibc keeps
 * such pages in the heap between live blocks, so a link that flaps grew the daemon per reset
 * (~55 KiB when the GRE and receive buffers were per link: the soak, docs/soak.md).  Links
 * end rarely: give the free pages back to the system then. */
static void give_back(void) {
    malloc_trim(0);
}

void rp_link_free(struct rp_link *l) {
    if (!l)
        return;
    free(l->buf);
    free(l->table);
    free(l->dirty);
    free(l);
    give_back();
}

int rp_link_set_flow(struct rp_link *l, uint32_t session, uint32_t tag, int fd, int header_fd,
                     int ttl, const uint8_t *dst, uint32_t key) {
    struct link_entry *e = find(l, session, tag);
    if (!e) {
        if (2 * (l->used + l->removed + 1) > l->slots &&
            resize(l, 2 * (l->used + 1) > l->slots / 2 ? l->slots * 2 : l->slots) < 0)
            return -1;
        size_t i = slot_of(session, tag, l->slots);
        while (l->table[i].used == 1)
            i = (i + 1) & (l->slots - 1);
        e = &l->table[i];
        if (e->used == 2)
            l->removed--;
        memset(e, 0, sizeof *e);
        e->used = 1;
        e->session = session;
        e->tag = tag;
        l->used++;
    }
    e->fd = fd;
    e->header_fd = header_fd;
    e->header_limit = 0;
    e->ttl = (uint8_t)ttl;
    e->key = key;
    memset(&e->dst, 0, sizeof e->dst);
    e->dst.sin_family = AF_INET;
    memcpy(&e->dst.sin_addr.s_addr, dst, 4);
    return 0;
}

void rp_link_clear_flow(struct rp_link *l, uint32_t session, uint32_t tag) {
    struct link_entry *e = find(l, session, tag);
    if (!e)
        return;
    if (e->dirty) {  /* its counts stay until taken (the caller takes them before, normally) */
        for (size_t j = 0; j < l->ndirty; j++)
            if (&l->table[l->dirty[j]] == e) {
                l->dirty[j] = l->dirty[--l->ndirty];
                break;
            }
    }
    e->used = 2;
    e->dirty = 0;
    l->used--;
    l->removed++;
}

size_t rp_link_flows(struct rp_link *l) { return l->used; }

size_t rp_link_buffered(struct rp_link *l) { return l->end - l->start; }

size_t rp_link_take_deltas(struct rp_link *l, struct rp_link_delta *out, size_t max) {
    size_t n = 0;
    while (n < max && l->ndirty) {
        struct link_entry *e = &l->table[l->dirty[--l->ndirty]];
        out[n] = e->delta;
        out[n].session = e->session;
        out[n].tag = e->tag;
        memset(&e->delta, 0, sizeof e->delta);
        e->dirty = 0;
        n++;
    }
    return n;
}

/* The GRE a call sends, batched (docs/gre-io.md "Batched sends"): each packet is built into
 * the arena and queued; flush() sends the queue with one sendmmsg per socket (a system call's
 * own price, paid once: ~17 us in the UML lab).  Flushed when full and before every
 * return to Python, so nothing waits across calls: a frame or event Python handles next finds
 * the GRE before it sent and counted, the entries and sockets still those queued (Python may
 * clear them, or the port close a socket, only between calls).  Per process, as above. */
#define ARENA (256 * 1024)               /* >= RP_GRE_HEADER_MAX + 65535: any GRE fits alone */
static uint8_t arena[ARENA];
static size_t arena_used;
static struct iovec batch_iov[RP_LINK_BATCH];
static struct link_entry *batch_entry[RP_LINK_BATCH];
static uint8_t batch_header[RP_LINK_BATCH];       /* 1: iov starts with C's IPv4 header */
static size_t batch_length;
static struct mmsghdr batch_msg[RP_LINK_BATCH];   /* built by flush(), grouped by socket */
static uint64_t send_calls;

uint64_t rp_link_send_calls(void) { return send_calls; }

/* The socket a queued packet goes to. */
static int socket_of(size_t j) {
    return batch_header[j] ? batch_entry[j]->header_fd : batch_entry[j]->fd;
}

/* The IPv4 header C writes before the GRE of an entry with a header_fd: what the kernel
 * writes on fd (DF clear: IP_PMTUDISC_DONT, the default TTL, no options); the kernel fills
 * in the length, the checksum, the ID (0 here) and the source (0: the socket's bound one). */
#define IP_HEADER 20
static void write_ip_header(uint8_t *h, const struct link_entry *e) {
    memset(h, 0, IP_HEADER);
    h[0] = 0x45;
    h[8] = e->ttl;
    h[9] = 47;  /* IPPROTO_GRE */
    memcpy(h + 16, &e->dst.sin_addr.s_addr, 4);
}

static void count_failed(struct rp_link_delta *d, int error) {
    if (error == EAGAIN || error == EWOULDBLOCK || error == ENOBUFS) {
        d->busy++;
    } else {
        d->errors++;
        d->last_errno = error;
    }
}

/* msg[0:n] on fd, each counted as its own sendto would be.  sendmmsg stops at the first
 * message that fails and returns how many went (its errno is not reported): the send is
 * made again from that one, which, first now, fails with its own errno (counted, then
 * the rest go on) or goes (the condition passed, as a later sendto would have found). */
static void send_run(int fd, struct mmsghdr *msg, struct link_entry **entry, size_t n,
                     int header) {
    size_t i = 0;
    while (i < n) {
        int sent = sendmmsg(fd, msg + i, (unsigned int)(n - i), 0);
        send_calls++;
        if (sent > 0) {
            for (int k = 0; k < sent; k++) {
                entry[i + k]->delta.sent++;
                entry[i + k]->delta.header_written += (uint32_t)header;
            }
            i += (size_t)sent;
        } else if (sent < 0 && errno == EINTR) {
            continue;   /* as Python's sendto (PEP 475) */
        } else if (sent < 0 && errno == EMSGSIZE && header) {
            /* over the device's MTU: the IP_HDRINCL path never fragments, fd does; the
             * entry's packets as long go there from now on (a real client's 1500-byte PPP
             * frames: each refusal costs two more system calls) */
            struct iovec *v = msg[i].msg_hdr.msg_iov;
            if (entry[i]->header_limit == 0 || v->iov_len < entry[i]->header_limit)
                entry[i]->header_limit = (uint32_t)v->iov_len;
            v->iov_base = (uint8_t *)v->iov_base + IP_HEADER;
            v->iov_len -= IP_HEADER;
            entry[i]->delta.header_refused++;
            send_run(entry[i]->fd, msg + i, entry + i, 1, 0);
            i++;
        } else {
            count_failed(&entry[i]->delta, sent < 0 ? errno : EIO);
            i++;
        }
    }
}

/* The queue sent: one run per socket, in the order its packets were queued (the order
 * between sockets is not kept: they are other sources, so other peers or sessions). */
static void flush(void) {
    static struct link_entry *grouped[RP_LINK_BATCH];
    static uint8_t done[RP_LINK_BATCH];
    size_t n = 0;
    memset(done, 0, batch_length);
    for (size_t first = 0; first < batch_length; first++) {
        if (done[first])
            continue;
        int fd = socket_of(first), header = batch_header[first];
        size_t run = n;
        for (size_t j = first; j < batch_length; j++) {
            if (done[j] || socket_of(j) != fd)   /* a socket is one or the other kind */
                continue;
            struct msghdr *h = &batch_msg[n].msg_hdr;
            memset(h, 0, sizeof *h);
            h->msg_name = &batch_entry[j]->dst;
            h->msg_namelen = sizeof batch_entry[j]->dst;
            h->msg_iov = &batch_iov[j];
            h->msg_iovlen = 1;
            grouped[n++] = batch_entry[j];
            done[j] = 1;
        }
        send_run(fd, batch_msg + run, grouped + run, n - run, header);
    }
    batch_length = arena_used = 0;
}

static void mark_dirty(struct rp_link *l, struct link_entry *e) {
    if (!e->dirty) {
        e->dirty = 1;
        l->dirty[l->ndirty++] = (size_t)(e - l->table);
    }
}

/* The sojourn gate's verdict on a frame of an entry: 1 to drop it (as GREPort drops a
 * captured packet older than the threshold, and asks the gate for the next one). */
static int too_old(struct rp_link *l) {
    if (l->drop_before == 0.0 || !(l->received_at < l->drop_before))
        return 0;
    l->drop_before = rp_gate_dropped(&l->gate);
    return 1;
}

/* A GRE frame C sends: 1 if taken (queued, counted; sent or dropped by flush(), or dropped
 * here as too old), 0 if Python must have it. */
static int send_gre(struct rp_link *l, const uint8_t *h, uint32_t length) {
    uint32_t flags = h[1] & 3, need = 2 + ((flags & 1) ? 4 : 0) + ((flags & 2) ? 4 : 0);
    if (length < need)
        return 0;   /* MalformedFrame in Python */
    const uint8_t *p = h + LINK_HEADER;
    struct link_entry *e = find(l, get32(h + 4), (uint32_t)p[0] << 8 | p[1]);
    if (!e)
        return 0;
    if (too_old(l)) {
        e->delta.aged++;
        mark_dirty(l, e);
        return 1;
    }
    int64_t seq = 0, ack = 0;
    size_t at = 2;
    if (flags & 1) { seq = get32(p + at); at += 4; }
    if (flags & 2) { ack = get32(p + at); at += 4; }
    /* room for the largest this can build (rp_build_gre refuses payloads over 65535 itself) */
    if (batch_length == RP_LINK_BATCH
            || ARENA - arena_used < IP_HEADER + RP_GRE_HEADER_MAX + (length - at))
        flush();
    uint8_t *start = arena + arena_used;
    long n = rp_build_gre(start + IP_HEADER, ARENA - arena_used - IP_HEADER, e->key, p + at,
                          length - at, flags & 1, seq, (flags & 2) != 0, ack);
    if (n < 0)
        return 0;   /* build_gre raises in Python: its path decides */
    int header = e->header_fd >= 0 && n <= 65535 - IP_HEADER
                 && (e->header_limit == 0 || (uint32_t)n + IP_HEADER < e->header_limit);
    if (header) {
        write_ip_header(start, e);
        n += IP_HEADER;
    } else {
        start += IP_HEADER;
    }
    batch_iov[batch_length].iov_base = start;
    batch_iov[batch_length].iov_len = (size_t)n;
    batch_header[batch_length] = (uint8_t)header;
    batch_entry[batch_length++] = e;
    arena_used = (size_t)(start - arena) + (size_t)n;
    struct rp_link_delta *d = &e->delta;
    d->packets++;
    d->bytes += length - at;
    mark_dirty(l, e);
    return 1;
}

/* Room for length more bytes after buf[end] (held bytes moved to the front if that makes it). */
static int reserve(struct rp_link *l, size_t length) {
    if (l->start == l->end) {
        l->start = l->end = 0;
    } else if (l->start && l->cap - l->end < length) {
        memmove(l->buf, l->buf + l->start, l->end - l->start);
        l->end -= l->start;
        l->start = 0;
    }
    if (l->cap - l->end < length) {
        size_t cap = l->cap ? l->cap : 65536;
        while (cap - l->end < length)
            cap *= 2;
        uint8_t *buf = realloc(l->buf, cap);
        if (!buf)
            return -1;
        l->buf = buf;
        l->cap = cap;
    }
    return 0;
}

/* The held complete frames: GRE of entries sent, the first run for Python in *out (see
 * rp_link_feed).  After a failure everything held is Python's. */
static int parse(struct rp_link *l, uint32_t max_payload, const uint8_t **out, size_t *out_length) {
    size_t run = l->start, runLength = 0;   /* frames for Python: buf[run:run + runLength] */
    if (l->failed) {
        runLength = l->end - l->start;
        l->start = l->end;
    }
    while (l->end - l->start >= LINK_HEADER) {
        const uint8_t *h = l->buf + l->start;
        uint32_t frameLength = get32(h + 8);
        if (frameLength > max_payload) {
            l->failed = 1;   /* FrameTooLarge in Python, from this header on */
            if (!runLength)
                run = l->start;
            runLength += l->end - l->start;
            l->start = l->end;
            break;
        }
        if (l->end - l->start - LINK_HEADER < frameLength)
            break;
        if (h[0] == LINK_GRE && get32(h + 4)) {
            if (runLength) {   /* Python's frames first, then this one */
                uint32_t flags = h[1] & 3, need = 2 + ((flags & 1) ? 4 : 0) + ((flags & 2) ? 4 : 0);
                if (frameLength >= need &&
                    find(l, get32(h + 4), (uint32_t)h[LINK_HEADER] << 8 | h[LINK_HEADER + 1])) {
                    *out = l->buf + run;
                    *out_length = runLength;
                    return RP_LINK_MORE;
                }
            } else if (send_gre(l, h, frameLength)) {
                l->start += LINK_HEADER + frameLength;
                continue;
            }
        }
        if (!runLength)
            run = l->start;
        runLength += LINK_HEADER + frameLength;
        l->start += LINK_HEADER + frameLength;
    }
    if (runLength) {
        *out = l->buf + run;
        *out_length = runLength;
    }
    return RP_LINK_DONE;
}

int rp_link_feed(struct rp_link *l, const uint8_t *data, size_t length, uint32_t max_payload,
                 const uint8_t **out, size_t *out_length) {
    *out = NULL;
    *out_length = 0;
    l->received_at = l->drop_before = 0.0;   /* bytes from Twisted's TLS: their age unknown */
    if (l->failed) {   /* Python's decoder has failed: the bytes are its to refuse */
        *out = data;
        *out_length = length;
        return RP_LINK_DONE;
    }
    if (length) {
        if (reserve(l, length) < 0)
            return RP_LINK_NO_MEMORY;
        memcpy(l->buf + l->end, data, length);
        l->end += length;
    }
    int code = parse(l, max_payload, out, out_length);
    flush();
    return code;
}

/* --- the link's TLS read (link.h, step 3b) ------------------------------------------------- */

typedef int (*rp_ssl_read_t)(void *ssl, void *data, int length);
typedef int (*rp_ssl_get_error_t)(const void *ssl, int result);
typedef int (*rp_bio_write_t)(void *bio, const void *data, int length);
typedef long (*rp_bio_get_mem_data_t)(void *bio, char **data);

#define SSL_ERROR_WANT_READ_ 2      /* <openssl/ssl.h>'s SSL_ERROR_WANT_READ (a stable ABI value) */
#define TLS_PLAINTEXT_IN (1 << 15)  /* SSL_read's size, as Twisted's recv(2**15) */

struct rp_tls_in {
    void *ssl, *read_bio, *write_bio;
    rp_ssl_read_t ssl_read;
    rp_ssl_get_error_t ssl_get_error;
    rp_bio_write_t bio_write;
    rp_bio_get_mem_data_t bio_get_mem_data;
    int fd;
    size_t recv_size;
};

struct rp_tls_in *rp_tls_in_new(uintptr_t ssl, uintptr_t read_bio, uintptr_t write_bio,
                                uintptr_t ssl_read, uintptr_t ssl_get_error, uintptr_t bio_write,
                                uintptr_t bio_get_mem_data, int fd, size_t recv_size) {
    struct rp_tls_in *t = calloc(1, sizeof *t);
    if (!t)
        return NULL;
    t->recv_size = recv_size && recv_size < RECV_MAX ? recv_size : RECV_MAX;
    t->ssl = (void *)ssl;
    t->read_bio = (void *)read_bio;
    t->write_bio = (void *)write_bio;
    t->ssl_read = (rp_ssl_read_t)ssl_read;
    t->ssl_get_error = (rp_ssl_get_error_t)ssl_get_error;
    t->bio_write = (rp_bio_write_t)bio_write;
    t->bio_get_mem_data = (rp_bio_get_mem_data_t)bio_get_mem_data;
    t->fd = fd;
    return t;
}

void rp_tls_in_free(struct rp_tls_in *t) {
    if (t) {
        free(t);
        give_back();
    }
}

/* SO_TIMESTAMPNS on a TCP socket (Linux >= 4.13): the receive time of the last skb this
 * read took, so the age of the youngest bytes read: once even those waited longer than the
 * gate's target, the receive queue stands.  0 without the option (or the cmsg). */
static double received_at(struct msghdr *m) {
    for (struct cmsghdr *c = CMSG_FIRSTHDR(m); c != NULL; c = CMSG_NXTHDR(m, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS) {
            struct timespec ts;
            memcpy(&ts, CMSG_DATA(c), sizeof ts);
            return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
        }
    }
    return 0.0;
}

/* Where a clock read is a system call (UML; a VM whose clocksource has no vDSO), one per
 * wake-up is a quarter of a wake-up's calls: read only when the gate needs it. */
static double wall_clock(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void rp_link_set_gate(struct rp_link *l, double target, double interval) {
    rp_gate_init(&l->gate, target, interval);
}

const struct rp_gate *rp_link_gate(struct rp_link *l) { return &l->gate; }

int rp_link_read(struct rp_link *l, struct rp_tls_in *t, int do_recv, int first_record,
                 uint32_t max_payload, const uint8_t **out, size_t *out_length,
                 struct rp_read_info *info, double now) {
    int flags = 0;
    *out = NULL;
    *out_length = 0;
    memset(info, 0, sizeof *info);
    if (do_recv) {
        ssize_t n;
        struct iovec iov = { recv_buffer, t->recv_size };
        union { char space[CMSG_SPACE(sizeof(struct timespec))]; struct cmsghdr align; } control;
        struct msghdr m;
        do {
            memset(&m, 0, sizeof m);
            m.msg_iov = &iov;
            m.msg_iovlen = 1;
            m.msg_control = control.space;
            m.msg_controllen = sizeof control.space;
            n = recvmsg(t->fd, &m, MSG_DONTWAIT);
        } while (n < 0 && errno == EINTR);
        l->received_at = n > 0 ? received_at(&m) : 0.0;
        if (l->gate.target > 0.0 && l->received_at > 0.0) {
            if ((size_t)n < t->recv_size && !l->gate.dropping)
                now = l->received_at;   /* it emptied the queue: nothing stands (CoDel) */
            else if (now <= 0.0) {
                now = wall_clock();
                info->clock_read = 1;
            }
            l->drop_before = rp_gate_drop_before(&l->gate, now);
        } else {
            l->drop_before = 0.0;
        }
        if (n == 0)
            return RP_READ_EOF;
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            info->error = errno;
            return RP_READ_SOCKET_ERROR;
        }
        info->received = (size_t)n;
        /* a memory BIO takes everything it is given, or fails (no memory) */
        if (t->bio_write(t->read_bio, recv_buffer, (int)n) != (int)n)
            return RP_READ_NO_MEMORY;
    }
    info->received_at = l->received_at;   /* (a continuation: its wake-up's recv) */
    for (;;) {
        parse(l, max_payload, out, out_length);
        if (*out_length || (first_record && info->plaintext)) {
            flags |= RP_READ_AGAIN;   /* Python's frames (or turn) first: it calls again */
            break;
        }
        if (reserve(l, TLS_PLAINTEXT_IN) < 0) {
            flush();
            return flags | RP_READ_NO_MEMORY;
        }
        int n = t->ssl_read(t->ssl, l->buf + l->end, TLS_PLAINTEXT_IN);
        if (n > 0) {
            l->end += (size_t)n;
            info->plaintext += (size_t)n;
            continue;
        }
        if (t->ssl_get_error(t->ssl, n) != SSL_ERROR_WANT_READ_) {
            /* close_notify, an alert, a bad record: the error queue is left as it is, for
             * Twisted's _flushReceiveBIO to meet the same (SSL_read says it again) */
            info->ssl_result = n;
            flags |= RP_READ_SSL_ERROR;
        }
        break;
    }
    flush();   /* the GRE of every record read, before Python has anything of this call */
    if (do_recv && l->gate.target > 0.0 && l->received_at > 0.0)
        rp_gate_observe(&l->gate, now, l->received_at);
    char *pending;
    if (t->bio_get_mem_data(t->write_bio, &pending) > 0)
        flags |= RP_READ_TLS_OUT;
    return flags;
}
