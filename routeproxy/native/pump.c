/* The capture pump (declared in pump.h): GREPort._frameReceived in C for one frame, the
 * flow table that frames the common packet for each flow's mux link, and a libpcap handle
 * read through it.  Compiled in one unit after gre.c (build.py), whose functions it calls.
 *
 * Every decision is the Python path's: rp_ipv4_gre for the IPv4 checks, then the bridge
 * duplicate check, the local-address check, and for unfragmented GRE of a flow entry from
 * its client the mux frame (rp_mux_gre_frame).  Anything else is handed back, so Python's
 * code (the one implementation of the unusual packet) decides it, in order.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <linux/filter.h>
#include <pcap/pcap.h>

#include "pump.h"

double rp_gate_dropped(struct rp_gate *g);   /* sojourn.h, later in the unit */

#define LAST_MAX 65536

struct rp_flow {
    uint8_t used;
    uint8_t held;        /* Python has an entry for the key (rp_pump_hold) */
    uint8_t touched;
    uint8_t link;        /* < RP_MAX_LINKS */
    uint8_t src[4];
    uint32_t session;
    uint32_t tag;
    uint32_t packets, dropped, too_large;
    uint64_t bytes;
};

/* A mux link: its budget for this pump call (valid while generation is the pump's) and the
 * frames built for it, in capture order. */
struct rp_link_out {
    uint64_t generation;
    int64_t room;
    int hand_back_over;
    int64_t max_payload;
    uint8_t *out;        /* out_capacity bytes, allocated when the link is first begun */
    size_t out_length;
    uint32_t out_frames;
};

struct rp_pump {
    /* the link layer */
    size_t link_length;
    long type_at;
    uint8_t type_value[8];
    size_t type_length;
    /* the port's local addresses */
    uint8_t (*local)[4];            /* n_local of them (malloc'd) */
    size_t n_local;
    /* the last frame that passed the IPv4 checks: (ident, checksum, src, total) and its
     * IP bytes */
    int has_last;
    uint16_t last_ident, last_checksum, last_total;
    uint8_t last_src[4];
    uint8_t last[LAST_MAX];
    /* this pump call: links begun for it have its generation; those with frames are in
     * used[], in the order of their first frame */
    double drop_before;
    struct rp_gate *gate;           /* the capture's sojourn gate in C, or NULL (Python's) */
    uint64_t generation;
    int has_head;
    double head;
    int back_reason;
    int back_link;
    /* frames of no call handed back in the current window (RP_PUNT_*) */
    double punt_window;
    uint64_t punt_generation;
    uint32_t punts;
    uint32_t punt_burst;
    size_t out_capacity;
    uint32_t n_used;
    uint8_t used[RP_MAX_LINKS];
    struct rp_link_out links[RP_MAX_LINKS];
    /* counters until the next take */
    struct rp_counts counts;
    uint32_t n_touched;
    uint16_t touched[RP_FLOW_KEYS];
    struct rp_flow flows[RP_FLOW_KEYS];
};

struct rp_pump *rp_pump_new(size_t out_capacity)
{
    struct rp_pump *p = calloc(1, sizeof *p);
    if (p == NULL)
        return NULL;
    p->out_capacity = out_capacity;
    p->generation = 1;  /* no link is begun: theirs is 0 */
    p->back_link = -1;
    p->type_at = -1;
    p->punt_burst = RP_PUNT_BURST;
    return p;
}

void rp_pump_free(struct rp_pump *p)
{
    if (p != NULL) {
        for (size_t i = 0; i < RP_MAX_LINKS; i++)
            free(p->links[i].out);
        free(p->local);
        free(p);
    }
}

int rp_pump_set_link(struct rp_pump *p, size_t link_length, long type_at,
                     const uint8_t *type_value, size_t type_length)
{
    if (type_length > sizeof p->type_value)
        return -1;
    p->link_length = link_length;
    p->type_at = type_at;
    if (type_length)
        memcpy(p->type_value, type_value, type_length);
    p->type_length = type_length;
    return 0;
}

int rp_pump_set_local(struct rp_pump *p, const uint8_t *addresses, size_t n)
{
    uint8_t (*local)[4] = malloc(n ? 4 * n : 1);
    if (local == NULL)
        return -1;
    if (n)
        memcpy(local, addresses, 4 * n);
    free(p->local);
    p->local = local;
    p->n_local = n;
    return 0;
}

int rp_pump_set_flow(struct rp_pump *p, uint32_t key, const uint8_t *src, uint32_t session,
                     uint32_t tag, uint32_t link)
{
    struct rp_flow *f = &p->flows[key & 0xFFFF];
    if (link >= RP_MAX_LINKS)
        return -1;
    f->used = 1;
    f->link = (uint8_t)link;  /* counters not yet taken stay the flow's: taken with this link */
    memcpy(f->src, src, 4);
    f->session = session;
    f->tag = tag;
    return 0;
}

void rp_pump_clear_flow(struct rp_pump *p, uint32_t key)
{
    p->flows[key & 0xFFFF].used = 0;  /* its counters wait for the next take */
}

void rp_pump_hold(struct rp_pump *p, uint32_t key, int held)
{
    p->flows[key & 0xFFFF].held = held != 0;
}

void rp_pump_set_punt(struct rp_pump *p, uint32_t frames)
{
    p->punt_burst = frames;
}

void rp_pump_begin(struct rp_pump *p, double drop_before, struct rp_gate *gate)
{
    p->drop_before = drop_before;
    p->gate = gate;
    p->generation++;  /* every link's budget is the last call's: none is begun */
    p->has_head = 0;
    p->back_reason = 0;
    p->back_link = -1;
    p->n_used = 0;
}

double rp_pump_drop_before(struct rp_pump *p)
{
    return p->drop_before;
}

int rp_pump_begin_link(struct rp_pump *p, uint32_t link, int64_t room, int hand_back_over,
                       int64_t max_payload)
{
    struct rp_link_out *l;
    if (link >= RP_MAX_LINKS)
        return -1;
    l = &p->links[link];
    if (l->out == NULL && (l->out = malloc(p->out_capacity ? p->out_capacity : 1)) == NULL)
        return -1;
    if (l->generation != p->generation) {  /* begun again in one call: its frames stay */
        l->generation = p->generation;
        l->out_length = 0;
        l->out_frames = 0;
    }
    l->room = room;
    l->hand_back_over = hand_back_over;
    l->max_payload = max_payload;
    return 0;
}

static int is_local(const struct rp_pump *p, const uint8_t *dst)
{
    for (size_t i = 0; i < p->n_local; i++)
        if (!memcmp(p->local[i], dst, 4))
            return 1;
    return 0;
}

static int hand_back(struct rp_pump *p, int reason)
{
    p->back_reason = reason;
    p->counts.handed_back++;
    return RP_PUMP_HAND_BACK;
}

/* A frame of no call (pump.h): handed back with reason while the window's share lasts,
 * else dropped and counted here. */
static int no_call(struct rp_pump *p, int reason, double ts, int has_ts)
{
    if (has_ts && ts != 0.0) {
        if (ts - p->punt_window >= RP_PUNT_WINDOW_MS / 1000.0 || ts < p->punt_window) {
            p->punt_window = ts;
            p->punts = 0;
        }
    } else if (p->punt_generation != p->generation) {
        p->punt_generation = p->generation;
        p->punts = 0;
    }
    if (p->punts < p->punt_burst) {
        p->punts++;
        p->counts.received--;   /* Python's received counts it */
        return hand_back(p, reason);
    }
    p->counts.no_call++;
    return RP_PUMP_TAKEN;
}

static struct rp_flow *touch(struct rp_pump *p, uint16_t key)
{
    struct rp_flow *f = &p->flows[key];
    if (!f->touched) {
        f->touched = 1;
        p->touched[p->n_touched++] = key;
    }
    return f;
}

static int pump_frame(struct rp_pump *p, const uint8_t *frame, size_t size, double ts,
                      int has_ts, int again)
{
    struct rp_ipv4 ip;
    struct rp_gre g;
    struct rp_flow *f;
    struct rp_link_out *l;
    const uint8_t *gre;
    size_t start;
    long n;
    int code;

    if (has_ts && ts != 0.0) {  /* Python: "if timestamp:", the head first */
        p->has_head = 1;
        p->head = ts;
        if (ts < p->drop_before) {
            if (p->gate == NULL)
                return hand_back(p, RP_BACK_SOJOURN);  /* Python's gate drops it */
            /* GREPort._frameReceived's drop, here: under an overload every frame of a full
             * ring may be this one, and a hand-back each cost a Python turn per frame */
            p->counts.received++;
            p->counts.sojourn++;
            p->drop_before = rp_gate_dropped(p->gate);
            return RP_PUMP_TAKEN;
        }
    }
    p->counts.received++;
    code = rp_ipv4_gre(frame, size, p->link_length, p->type_at, p->type_value, p->type_length,
                       &ip);
    switch (code) {
    case RP_IPV4_NOT_IPV4: p->counts.not_ipv4++; return RP_PUMP_TAKEN;
    case RP_IPV4_TRUNCATED: p->counts.truncated++; return RP_PUMP_TAKEN;
    case RP_IPV4_BAD_HEADER: p->counts.bad_header++; return RP_PUMP_TAKEN;
    case RP_IPV4_NOT_GRE: p->counts.not_gre++; return RP_PUMP_TAKEN;
    default: break;
    }
    /* a bridge's second copy: header fields first, the bytes only when they match */
    start = p->link_length;
    if (again)
        goto checked;  /* checked, and kept as the last frame, when it was handed back */
    if (p->has_last && ip.ident == p->last_ident && ip.checksum == p->last_checksum
        && ip.total == p->last_total && !memcmp(ip.src, p->last_src, 4)
        && !memcmp(frame + start, p->last, ip.total)) {
        p->counts.duplicates++;
        return RP_PUMP_TAKEN;
    }
    p->has_last = 1;
    p->last_ident = ip.ident;
    p->last_checksum = ip.checksum;
    p->last_total = ip.total;
    memcpy(p->last_src, ip.src, 4);
    memcpy(p->last, frame + start, ip.total);  /* total <= 65535 < LAST_MAX, within size */
checked:
    if (!is_local(p, ip.dst)) {
        p->counts.not_local++;
        return RP_PUMP_TAKEN;
    }
    if (code == RP_IPV4_FRAGMENT)
        goto back_fragment;
    if (code == RP_IPV4_EMPTY) {
        p->counts.truncated++;
        return RP_PUMP_TAKEN;
    }
    gre = frame + ip.gre_offset;
    if (rp_split_gre(gre, ip.gre_length, &g) < 0)
        goto back_malformed;
    f = &p->flows[g.call_id];
    if (!f->used)
        goto back_unknown;
    if (memcmp(f->src, ip.src, 4))
        goto back_wrong;
    l = &p->links[f->link];
    if (l->generation != p->generation) {
        p->back_link = f->link;
        goto back_no_link;
    }
    if ((int64_t)g.payload_length + 10 > l->max_payload) {
        f = touch(p, g.call_id);
        f->too_large++;
    } else if ((int64_t)l->out_length >= l->room) {
        if (l->hand_back_over)
            goto back_budget;
        f = touch(p, g.call_id);
        f->dropped++;
    } else {
        size_t room = p->out_capacity - l->out_length;
        if (room < RP_MUX_GRE_HEAD_MAX + g.payload_length)
            goto back_no_room;
        n = rp_mux_gre_frame(l->out + l->out_length, room, f->session, f->tag, g.has_seq,
                             g.seq, g.has_ack, g.ack, gre + g.payload_offset,
                             g.payload_length);
        if (n < 0)
            goto back_no_room;
        if (!l->out_frames)
            p->used[p->n_used++] = f->link;  /* each link once per call: n_used <= RP_MAX_LINKS */
        l->out_length += (size_t)n;
        l->out_frames++;
        f = touch(p, g.call_id);
    }
    f->packets++;
    f->bytes += g.payload_length;
    p->counts.delivered++;
    return RP_PUMP_TAKEN;

    /* handed back after the checks above: Python's received counts it, not ours */
back_fragment: p->counts.received--; return hand_back(p, RP_BACK_FRAGMENT);
back_malformed: return no_call(p, RP_BACK_MALFORMED, ts, has_ts);
back_unknown:
    if (f->held) {   /* Python's entry, not in C: the Python path delivers it */
        p->counts.received--;
        return hand_back(p, RP_BACK_UNKNOWN_KEY);
    }
    return no_call(p, RP_BACK_UNKNOWN_KEY, ts, has_ts);
back_wrong: return no_call(p, RP_BACK_WRONG_SOURCE, ts, has_ts);
back_budget: p->counts.received--; return hand_back(p, RP_BACK_BUDGET);
back_no_room: p->counts.received--; return hand_back(p, RP_BACK_NO_ROOM);
back_no_link: p->counts.received--; return hand_back(p, RP_BACK_NO_LINK);
}

int rp_pump_frame(struct rp_pump *p, const uint8_t *frame, size_t size, double ts, int has_ts)
{
    return pump_frame(p, frame, size, ts, has_ts, 0);
}

int rp_pump_frame_again(struct rp_pump *p, const uint8_t *frame, size_t size, double ts,
                        int has_ts)
{
    return pump_frame(p, frame, size, ts, has_ts, 1);
}

const uint8_t *rp_pump_out(struct rp_pump *p, uint32_t i, uint32_t *link, size_t *length,
                           uint32_t *frames)
{
    struct rp_link_out *l;
    if (i >= p->n_used)
        return NULL;
    *link = p->used[i];
    l = &p->links[p->used[i]];
    *length = l->out_length;
    *frames = l->out_frames;
    return l->out;
}

int rp_pump_head(struct rp_pump *p, double *head)
{
    *head = p->head;
    return p->has_head;
}

int rp_pump_back_reason(struct rp_pump *p) { return p->back_reason; }

int rp_pump_back_link(struct rp_pump *p) { return p->back_link; }

void rp_pump_take_counts(struct rp_pump *p, struct rp_counts *out)
{
    *out = p->counts;
    out->links = p->n_used;
    memset(&p->counts, 0, sizeof p->counts);
}

size_t rp_pump_take_deltas(struct rp_pump *p, struct rp_flow_delta *out, size_t max)
{
    size_t n = 0;
    while (p->n_touched && n < max) {
        uint16_t key = p->touched[--p->n_touched];
        struct rp_flow *f = &p->flows[key];
        out[n].key = key;
        out[n].packets = f->packets;
        out[n].bytes = f->bytes;
        out[n].dropped = f->dropped;
        out[n].too_large = f->too_large;
        out[n].link = f->link;
        f->packets = f->dropped = f->too_large = 0;
        f->bytes = 0;
        f->touched = 0;
        n++;
    }
    return n;
}

uint64_t rp_pump_delivered(struct rp_pump *p) { return p->counts.delivered; }

/* -- libpcap ------------------------------------------------------------------------------ */

struct rp_pcap {
    pcap_t *handle;
    struct rp_pump *pump;
    int read;
    int back;
    size_t back_length;
    double back_ts;
    uint8_t *back_buffer;
    size_t back_capacity;
};

static void error_text(char *err, const char *what, const char *detail)
{
    snprintf(err, 256, "%s: %s", what, detail);
}

/* Our own GRE (docs/gre-io.md, "Our own GRE is never received"): every raw socket a GREPort
 * sends from carries SO_MARK RP_SELF_MARK (routeproxy.capture.SELF_MARK, the same value), and
 * every capture's kernel filter begins with these instructions: A = the packet's mark; if it
 * is ours, drop; A = 0 (as the kernel starts a program); then the capture's own program.  A
 * packet the host sends to itself (pptpd beside the RRP) keeps its mark through `lo`, so
 * what we sent is never queued on our own capture. */
#define RP_SELF_MARK 0x2f
#define RP_SELF_PREFIX 4
#define RP_ACCEPT_ALL 262144   /* the "ret" of a capture without a program: never trims */

static int attach_without_own(int fd, const struct sock_filter *program, size_t n, char *err)
{
    static const struct sock_filter prefix[RP_SELF_PREFIX] = {
        { BPF_LD | BPF_W | BPF_ABS, 0, 0, (uint32_t)(SKF_AD_OFF + SKF_AD_MARK) },
        { BPF_JMP | BPF_JEQ | BPF_K, 0, 1, RP_SELF_MARK },
        { BPF_RET | BPF_K, 0, 0, 0 },
        { BPF_LD | BPF_IMM, 0, 0, 0 },
    };
    static const struct sock_filter accept_all = { BPF_RET | BPF_K, 0, 0, RP_ACCEPT_ALL };
    struct sock_filter *all;
    struct sock_fprog fprog;
    int failed;

    if (n == 0) {
        program = &accept_all;
        n = 1;
    }
    if (n + RP_SELF_PREFIX > BPF_MAXINSNS) {
        snprintf(err, 256, "bad filter: %zu instructions, at most %d", n,
                 BPF_MAXINSNS - RP_SELF_PREFIX);
        return -1;
    }
    all = malloc((n + RP_SELF_PREFIX) * sizeof *all);
    if (all == NULL) {
        snprintf(err, 256, "cannot set the filter: out of memory");
        return -1;
    }
    memcpy(all, prefix, sizeof prefix);
    memcpy(all + RP_SELF_PREFIX, program, n * sizeof *all);
    fprog.len = (unsigned short)(n + RP_SELF_PREFIX);
    fprog.filter = all;
    failed = setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, &fprog, sizeof fprog) < 0;
    if (failed)
        snprintf(err, 256, "cannot set the filter: %s", strerror(errno));
    free(all);
    return failed ? -1 : 0;
}

/* libpcap has attached its program to the handle's packet socket (rewritten for the kernel:
 * a cooked "any" handle's offsets moved): read back what the kernel holds and attach it again
 * behind the check.  Not the check given to pcap_setfilter: libpcap also runs its copy of the
 * program in user space (on the frames the ring held when the filter changed, and on all of
 * them where the kernel cannot take it), and its interpreter cannot load a mark, so every
 * such frame would be dropped (older libpcap also moved a cooked handle's ancillary loads).
 * No kernel program (libpcap filters in user space): the check alone. */
static int reject_own(pcap_t *handle, char *err)
{
    int fd = pcap_fileno(handle);
    socklen_t n = 0;
    struct sock_filter *program = NULL;
    int failed;

    if (getsockopt(fd, SOL_SOCKET, SO_GET_FILTER, NULL, &n) < 0) {   /* n: instructions */
        snprintf(err, 256, "cannot read the filter back: %s", strerror(errno));
        return -1;
    }
    if (n > 0) {
        program = malloc(n * sizeof *program);
        if (program == NULL) {
            snprintf(err, 256, "cannot set the filter: out of memory");
            return -1;
        }
        if (getsockopt(fd, SOL_SOCKET, SO_GET_FILTER, program, &n) < 0) {
            snprintf(err, 256, "cannot read the filter back: %s", strerror(errno));
            free(program);
            return -1;
        }
    }
    failed = attach_without_own(fd, program, n, err);
    free(program);
    return failed;
}

static int compile_filter(pcap_t *handle, const char *filter, char *err)
{
    struct bpf_program program;
    int failed;

    if (pcap_compile(handle, &program, filter, 1, PCAP_NETMASK_UNKNOWN) < 0) {
        error_text(err, "bad filter", pcap_geterr(handle));
        return -1;
    }
    failed = pcap_setfilter(handle, &program) < 0;
    if (failed)
        error_text(err, "cannot set the filter", pcap_geterr(handle));
    pcap_freecode(&program);
    if (!failed && reject_own(handle, err) < 0)
        return -1;
    return failed ? -1 : 0;
}

struct rp_pcap *rp_pcap_open(const char *device, int snaplen, int buffer_size,
                             const char *filter, char *err)
{
    char errbuf[PCAP_ERRBUF_SIZE] = "";
    struct rp_pcap *c = calloc(1, sizeof *c);
    pcap_t *handle;
    int status;

    if (c == NULL || (c->back_buffer = malloc((size_t)snaplen)) == NULL) {
        free(c);
        error_text(err, "cannot open", "out of memory");
        return NULL;
    }
    c->back_capacity = (size_t)snaplen;
    handle = pcap_create(device, errbuf);
    if (handle == NULL) {
        error_text(err, "cannot open", errbuf);
        goto fail;
    }
    pcap_set_snaplen(handle, snaplen);
    pcap_set_promisc(handle, 0);
    pcap_set_timeout(handle, 1);
    pcap_set_immediate_mode(handle, 1);
    if (buffer_size > 0)
        pcap_set_buffer_size(handle, buffer_size);
    status = pcap_activate(handle);
    if (status < 0) {
        error_text(err, "cannot activate", pcap_geterr(handle));
        goto fail_handle;
    }
    if (compile_filter(handle, filter, err) < 0)
        goto fail_handle;
    if (pcap_setnonblock(handle, 1, errbuf) < 0) {
        error_text(err, "cannot set non-blocking", errbuf);
        goto fail_handle;
    }
    pcap_setdirection(handle, PCAP_D_IN);  /* only what arrives; `lo` skips the copy anyway */
    c->handle = handle;
    return c;

fail_handle:
    pcap_close(handle);
fail:
    free(c->back_buffer);
    free(c);
    return NULL;
}

int rp_pcap_set_filter(struct rp_pcap *c, const char *filter, char *err)
{
    return compile_filter(c->handle, filter, err);
}

int rp_pcap_fileno(struct rp_pcap *c) { return pcap_get_selectable_fd(c->handle); }

int rp_pcap_datalink(struct rp_pcap *c) { return pcap_datalink(c->handle); }

int rp_pcap_stats(struct rp_pcap *c, uint64_t *received, uint64_t *dropped, uint64_t *ifdropped)
{
    struct pcap_stat s;
    if (pcap_stats(c->handle, &s) < 0)
        return -1;
    *received = s.ps_recv;
    *dropped = s.ps_drop;
    *ifdropped = s.ps_ifdrop;
    return 0;
}

void rp_pcap_close(struct rp_pcap *c)
{
    if (c != NULL) {
        pcap_close(c->handle);
        free(c->back_buffer);
        free(c);
    }
}

static void on_frame(u_char *user, const struct pcap_pkthdr *h, const u_char *bytes)
{
    struct rp_pcap *c = (struct rp_pcap *)user;
    double ts = (double)h->ts.tv_sec + (double)h->ts.tv_usec / 1e6;
    size_t length = h->caplen;

    if (c->back)
        return;  /* after a break: none comes, but never two hand-backs */
    c->read++;
    if (rp_pump_frame(c->pump, bytes, length, ts, 1) == RP_PUMP_HAND_BACK) {
        if (length > c->back_capacity)
            length = c->back_capacity;  /* caplen <= snaplen: not reached */
        memcpy(c->back_buffer, bytes, length);
        c->back = 1;
        c->back_length = length;
        c->back_ts = ts;
        pcap_breakloop(c->handle);
    }
}

int rp_pcap_pump(struct rp_pcap *c, struct rp_pump *p, int budget, const uint8_t **back,
                 size_t *back_length, double *back_ts, char *err)
{
    int n;

    c->pump = p;
    c->read = 0;
    c->back = 0;
    n = pcap_dispatch(c->handle, budget, on_frame, (u_char *)c);
    if (n == PCAP_ERROR) {
        error_text(err, "capture failed", pcap_geterr(c->handle));
        return -1;
    }
    *back = c->back ? c->back_buffer : NULL;
    *back_length = c->back ? c->back_length : 0;
    *back_ts = c->back_ts;
    return c->read;
}

/* --- the link's TLS write (pump.h, step 3b) ------------------------------------------------ */

#include <errno.h>
#include <sys/socket.h>

typedef int (*rp_ssl_write_t)(void *ssl, const void *data, int length);
typedef int (*rp_bio_read_t)(void *bio, void *data, int length);

#define TLS_RECORD_IN (1 << 14)  /* SSL_write a TLS record's worth at a time, as Twisted does */
#define TLS_READ_MIN (1 << 15)

struct rp_tls {
    void *ssl;
    void *write_bio;
    rp_ssl_write_t ssl_write;
    rp_bio_read_t bio_read;
    int fd;
};

/* The records read from a write BIO, for the call's send: one buffer per process, not per
 * link (used inside one call from the reactor's thread alone; per-link buffers freed at each
 * link's end left holes in the heap: the soak, docs/soak.md).  It grows, never shrinks. */
static uint8_t *records;
static size_t records_capacity;

struct rp_tls *rp_tls_new(uintptr_t ssl, uintptr_t write_bio, uintptr_t ssl_write,
                          uintptr_t bio_read, int fd)
{
    struct rp_tls *t = calloc(1, sizeof *t);
    if (t == NULL)
        return NULL;
    if (records == NULL) {
        records = malloc(4 * TLS_READ_MIN);
        if (records == NULL) {
            free(t);
            return NULL;
        }
        records_capacity = 4 * TLS_READ_MIN;
    }
    t->ssl = (void *)ssl;
    t->write_bio = (void *)write_bio;
    t->ssl_write = (rp_ssl_write_t)ssl_write;
    t->bio_read = (rp_bio_read_t)bio_read;
    t->fd = fd;
    return t;
}

void rp_tls_free(struct rp_tls *t)
{
    free(t);
}

/* Everything in the write BIO into records: its length, or -1 without memory (what was read
 * stays in records: *n says how much). */
static int read_records(struct rp_tls *t, size_t *n)
{
    *n = 0;
    for (;;) {
        if (records_capacity - *n < TLS_READ_MIN) {
            size_t capacity = 2 * records_capacity;
            uint8_t *buf = realloc(records, capacity);
            if (buf == NULL)
                return -1;
            records = buf;
            records_capacity = capacity;
        }
        size_t room = records_capacity - *n;
        int got = t->bio_read(t->write_bio, records + *n, room > INT32_MAX ? INT32_MAX : (int)room);
        if (got <= 0)
            return 0;
        *n += (size_t)got;
    }
}

int rp_tls_send(struct rp_tls *t, const uint8_t *data, size_t length, size_t *taken,
                const uint8_t **rest, size_t *rest_length, int *send_errno)
{
    int result = RP_TLS_SENT;
    size_t done = 0;
    while (done < length) {
        size_t chunk = length - done < TLS_RECORD_IN ? length - done : TLS_RECORD_IN;
        int w = t->ssl_write(t->ssl, data + done, (int)chunk);
        if (w <= 0) {
            result = RP_TLS_WRITE_FAILED;
            break;
        }
        done += (size_t)w;  /* a short write (partial writes on): the rest next round */
    }
    *taken = done;
    size_t n;
    if (read_records(t, &n) < 0 && result == RP_TLS_SENT)
        result = RP_TLS_NO_MEMORY;
    size_t sent = 0;
    *send_errno = 0;
    while (sent < n) {
        ssize_t s = send(t->fd, records + sent, n - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (s < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                *send_errno = errno;
            break;
        }
        sent += (size_t)s;
    }
    *rest = records + sent;
    *rest_length = n - sent;
    return result;
}
