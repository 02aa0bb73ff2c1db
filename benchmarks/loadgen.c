/* The benchmark's GRE sender and sink in C: benchmarks/loadgen.py's engine, same options, same
 * probe, same JSON.
 *
 *     loadgen send --dst 10.0.0.2 --size 64 --rate 146000 --duration 3 --keys 7,8 --run 5 [--ifname ...]
 *     loadgen sink --run 5 [--latency]   # drains, prints "ready {...}", JSON on SIGUSR1/SIGTERM
 *     loadgen constants                  # its constants as JSON (a test compares them with loadgen.py's)
 *     loadgen percentiles < ns-per-line  # the sink's latency_us of those samples (the same test)
 *
 * Why: the instruments share the machine's CPUs with the system under test.  In Python each of
 * them costs a few microseconds per packet (0.6 CPU of 2 at 64 B, 146 k pps), CPU the daemons
 * then wait for; here the per-packet work is a few stores and loads.  The sender also takes its
 * time stamp just before sendmmsg, after the batch is built, so its own work is not latency.
 *
 * loadgen.py is the reference (its docstring says why each choice); benchmarks/instrument.py
 * builds this file on first use (cc -O2 -Wall) and falls back to loadgen.py without a compiler.
 * Errors: one line "loadgen: ..." on stderr and exit status 2, as loadgen.py's LoadgenError.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <math.h>
#include <net/if.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* The probe format and size rules: loadgen.py's constants (tests/unit/test_loadgen_engines.py
 * compares them through "loadgen constants"). */
#define IP_HEADER 20
#define GRE_HEADER 12                 /* K+S: flags, protocol, payload length, call ID, sequence */
#define PROBE_SIZE 28                 /* "!4sIIQQ": magic, run, flow, sequence, send time (ns) */
static const unsigned char MAGIC[4] = {'R', 'P', 'b', '1'};
#define MIN_SIZE (IP_HEADER + GRE_HEADER + PROBE_SIZE)
#define MAX_SIZE 2000
#define LINK_MTU 1500
#define SNDBUF (4 << 20)
#define RCVBUF (64 << 20)
#define SINK_SLOT 2048
#define SINK_CONTROL 64
#define MAX_BATCH 1024
#define RCVTIMEO_US 50000
#define ETHER_HEADER 14
#define IPPROTO_GRE_ 47
#ifndef PACKET_QDISC_BYPASS
#define PACKET_QDISC_BYPASS 20
#endif
#ifndef SO_TIMESTAMPNS
#define SO_TIMESTAMPNS 35
#endif

/* Offsets in a GRE packet (from its first byte) of what changes per packet, and the probe. */
enum { OFF_CALL = 6, OFF_GRE_SEQ = 8, OFF_MAGIC = 12, OFF_RUN = 16, OFF_FLOW = 20, OFF_SEQ = 24, OFF_STAMP = 32 };

static void die(const char *fmt, ...)
{
    va_list ap;
    fputs("loadgen: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(2);
}

static int64_t clock_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static double monotonic(void) { return clock_ns(CLOCK_MONOTONIC) / 1e9; }

static void put16(unsigned char *p, uint16_t v) { p[0] = v >> 8; p[1] = v; }
static void put32(unsigned char *p, uint32_t v) { put16(p, v >> 16); put16(p + 2, v); }
static void put64(unsigned char *p, uint64_t v) { put32(p, v >> 32); put32(p + 4, v); }
static uint32_t get16(const unsigned char *p) { return (uint32_t)p[0] << 8 | p[1]; }
static uint32_t get32(const unsigned char *p) { return get16(p) << 16 | get16(p + 2); }
static uint64_t get64(const unsigned char *p) { return (uint64_t)get32(p) << 32 | get32(p + 4); }

/* --- JSON as Python's json.dumps writes it (", " and ": ", floats with a point) ------------ */

static void put_double(double x)
{
    char text[40];
    for (int precision = 15; precision <= 17; precision++) {   /* the shortest that round-trips */
        snprintf(text, sizeof text, "%.*g", precision, x);
        if (strtod(text, NULL) == x)
            break;
    }
    fputs(text, stdout);
    if (!strpbrk(text, ".eni"))
        fputs(".0", stdout);
}

/* --- options: "--name value" or "--name=value", as argparse takes them --------------------- */

enum kind { TEXT, INT, FLOAT, FLAG };
struct option { const char *name; enum kind kind; void *value; };

static long long parse_int(const char *name, const char *text)
{
    char *end;
    errno = 0;
    long long v = strtoll(text, &end, 10);
    if (errno || end == text || *end)
        die("argument %s: invalid int value: '%s'", name, text);
    return v;
}

static void parse_options(int argc, char **argv, struct option *options)
{
    for (int i = 0; i < argc; i++) {
        const char *arg = argv[i], *eq = strchr(arg, '=');
        size_t len = eq ? (size_t)(eq - arg) : strlen(arg);
        struct option *o = options;
        while (o->name && !(strlen(o->name) == len && strncmp(o->name, arg, len) == 0))
            o++;
        if (!o->name)
            die("unrecognized argument: %s", arg);
        if (o->kind == FLAG) {
            if (eq)
                die("argument %s: ignored explicit argument '%s'", o->name, eq + 1);
            *(int *)o->value = 1;
            continue;
        }
        const char *text = eq ? eq + 1 : i + 1 < argc ? argv[++i] : NULL;
        if (!text)
            die("argument %s: expected one argument", o->name);
        if (o->kind == TEXT) {
            *(const char **)o->value = text;
        } else if (o->kind == INT) {
            *(long long *)o->value = parse_int(o->name, text);
        } else {
            char *end;
            double v = strtod(text, &end);
            if (end == text || *end || !isfinite(v))
                die("argument %s: invalid float value: '%s'", o->name, text);
            *(double *)o->value = v;
        }
    }
}

/* --- the sender --------------------------------------------------------------------------- */

static void parse_mac(const char *text, unsigned char *mac)
{
    unsigned v[6];
    char extra;
    if (sscanf(text, "%2x:%2x:%2x:%2x:%2x:%2x%c", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &extra) != 6)
        die("not a MAC address: '%s'", text);
    for (int i = 0; i < 6; i++)
        mac[i] = v[i];
}

static struct in_addr parse_ip(const char *text)
{
    struct in_addr a;
    if (!inet_aton(text, &a))
        die("not an IPv4 address: '%s'", text);
    return a;
}

static void check_size(long long size)
{
    if (size < MIN_SIZE || size > MAX_SIZE)
        die("packet size %lld outside %d..%d (IPv4 bytes)", size, MIN_SIZE, MAX_SIZE);
}

/* Ethernet + IPv4 header (checksum included) for a GRE packet of gre_length bytes: Link.headers. */
static void link_headers(unsigned char *h, const unsigned char *dst_mac, const unsigned char *src_mac,
                         struct in_addr src, struct in_addr dst, int gre_length)
{
    unsigned char *ip = h + ETHER_HEADER;
    memcpy(h, dst_mac, 6);
    memcpy(h + 6, src_mac, 6);
    put16(h + 12, 0x0800);
    memset(ip, 0, IP_HEADER);
    ip[0] = 0x45;
    put16(ip + 2, IP_HEADER + gre_length);
    put16(ip + 6, 0x4000);                      /* don't fragment */
    ip[8] = 64;
    ip[9] = IPPROTO_GRE_;
    memcpy(ip + 12, &src, 4);
    memcpy(ip + 16, &dst, 4);
    uint32_t sum = 0;
    for (int i = 0; i < IP_HEADER; i += 2)
        sum += get16(ip + i);
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    put16(ip + 10, ~sum & 0xFFFF);
}

static int send_main(int argc, char **argv)
{
    const char *dst = NULL, *keys_text = "0", *mode = "sendmmsg", *ifname = NULL, *src = NULL;
    const char *src_mac_text = NULL, *dst_mac_text = NULL;
    long long size = 1400, flow_base = 0, run = 0, batch = 64;
    double rate = 0, duration = 1.0;
    struct option options[] = {
        {"--dst", TEXT, &dst}, {"--size", INT, &size}, {"--rate", FLOAT, &rate},
        {"--duration", FLOAT, &duration}, {"--keys", TEXT, &keys_text}, {"--flow-base", INT, &flow_base},
        {"--run", INT, &run}, {"--batch", INT, &batch}, {"--mode", TEXT, &mode},
        {"--ifname", TEXT, &ifname}, {"--src", TEXT, &src}, {"--src-mac", TEXT, &src_mac_text},
        {"--dst-mac", TEXT, &dst_mac_text}, {NULL, 0, NULL}};
    parse_options(argc, argv, options);
    if (!dst)
        die("the following arguments are required: --dst");
    if (strcmp(mode, "sendmmsg") != 0)
        die("--mode %s: the C engine sends with sendmmsg only (the sendto loop is loadgen.py's)", mode);
    if (rate < 0)
        die("rate %g below 0", rate);

    /* Call IDs, one per session: comma-separated ("" means one key, 0). */
    int nkeys = 1;
    for (const char *c = keys_text; *c; c++)
        nkeys += *c == ',';
    uint16_t *keys = calloc(nkeys, sizeof *keys);
    if (!keys)
        die("out of memory");
    int given = *keys_text != 0;
    for (int k = 0; given && k < nkeys; k++) {   /* an empty item ("7,,8", "7,") is an error */
        char item[32];
        size_t len = strcspn(keys_text, ",");
        if (len >= sizeof item)
            die("argument --keys: invalid int value: '%.*s'", (int)len, keys_text);
        memcpy(item, keys_text, len);
        item[len] = 0;
        long long key = parse_int("--keys", item);
        if (key < 0 || key > 0xFFFF)
            die("call ID %lld outside 0..65535", key);
        keys[k] = key;
        if (keys_text[len])
            keys_text += len + 1;
    }

    int link = ifname != NULL;
    unsigned char src_mac[6], dst_mac[6];
    if (link) {
        if (!(src && src_mac_text && dst_mac_text))
            die("--ifname needs --src, --src-mac and --dst-mac");
        parse_mac(src_mac_text, src_mac);
        parse_mac(dst_mac_text, dst_mac);
    }
    check_size(size);
    if (batch < 1 || batch > MAX_BATCH)
        die("batch %lld outside 1..%d", batch, MAX_BATCH);
    if (run < 0 || run > 0xFFFFFFFFLL || flow_base < 0 || flow_base + nkeys - 1 > 0xFFFFFFFFLL)
        die("--run and --flow-base must fit in 32 bits");
    struct in_addr dst_ip = parse_ip(dst), src_ip = {0};
    if (size > LINK_MTU)
        link = 0;   /* a frame cannot be fragmented: the kernel's IP output can */

    int fd;
    struct sockaddr_in name = {.sin_family = AF_INET, .sin_addr = dst_ip};
    int prefix = 0;
    if (link) {
        src_ip = parse_ip(src);
        fd = socket(AF_PACKET, SOCK_RAW, 0);
        if (fd < 0)
            die("an AF_PACKET socket needs root/CAP_NET_RAW: %s", strerror(errno));
        struct sockaddr_ll ll = {.sll_family = AF_PACKET, .sll_ifindex = if_nametoindex(ifname)};
        if (!ll.sll_ifindex || bind(fd, (struct sockaddr *)&ll, sizeof ll) < 0)
            die("cannot send on %s: %s", ifname, strerror(errno));
        int one = 1;
        setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof one);
        prefix = ETHER_HEADER + IP_HEADER;
    } else {
        fd = socket(AF_INET, SOCK_RAW, IPPROTO_GRE_);
        if (fd < 0)
            die("a raw GRE socket needs root/CAP_NET_RAW: %s", strerror(errno));
    }
    int sndbuf = SNDBUF;
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof sndbuf) < 0)
        die("SO_SNDBUFFORCE: %s", strerror(errno));

    /* One batch of whole packets, built once; per packet only its variable fields change. */
    int gre_length = size - IP_HEADER, slot = prefix + gre_length;
    unsigned char *buffer = calloc(batch, slot);
    struct iovec *iov = calloc(batch, sizeof *iov);
    struct mmsghdr *msgs = calloc(batch, sizeof *msgs);
    if (!buffer || !iov || !msgs)
        die("out of memory");
    for (int i = 0; i < batch; i++) {
        unsigned char *p = buffer + (size_t)i * slot, *gre = p + prefix;
        if (link)
            link_headers(p, dst_mac, src_mac, src_ip, dst_ip, gre_length);
        put16(gre, 0x3001);
        put16(gre + 2, 0x880B);
        put16(gre + 4, gre_length - GRE_HEADER);
        memcpy(gre + OFF_MAGIC, MAGIC, 4);
        put32(gre + OFF_RUN, run);
        iov[i].iov_base = p;
        iov[i].iov_len = slot;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        if (!link) {
            msgs[i].msg_hdr.msg_name = &name;
            msgs[i].msg_hdr.msg_namelen = sizeof name;
        }
    }

    prctl(PR_SET_TIMERSLACK, 1000, 0, 0, 0);   /* short sleeps between batches not stretched to 50 us */
    uint64_t sent = 0, errors = 0, calls = 0, seq = 0;
    int64_t start = clock_ns(CLOCK_MONOTONIC), end = start + (int64_t)(duration * 1e9);
    for (;;) {
        int64_t now = clock_ns(CLOCK_MONOTONIC);
        if (now >= end)
            break;
        long long n = batch;
        if (rate) {
            long long due = (long long)((now - start) * rate / 1e9) + 1 - (long long)sent;
            if (due <= 0) {   /* sleep until the next packet is due (the timer slack is 1 us) */
                int64_t at = start + (int64_t)(sent / rate * 1e9);
                struct timespec ts = {at / 1000000000, at % 1000000000};
                if (at > now)
                    clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
                continue;
            }
            if (due < batch)
                n = due;
        }
        for (long long i = 0; i < n; i++) {
            uint64_t k = seq + i;
            unsigned index = k % nkeys;
            unsigned char *gre = buffer + (size_t)i * slot + prefix;
            put16(gre + OFF_CALL, keys[index]);
            put32(gre + OFF_GRE_SEQ, (uint32_t)k);
            put32(gre + OFF_FLOW, flow_base + index);
            put64(gre + OFF_SEQ, k);
        }
        /* The send time last, just before the system call: the batch's building is not latency. */
        uint64_t stamp = clock_ns(CLOCK_REALTIME);
        for (long long i = 0; i < n; i++)
            put64(buffer + (size_t)i * slot + prefix + OFF_STAMP, stamp);
        int done = sendmmsg(fd, msgs, n, 0);
        calls++;
        if (done < 0) {
            if (errno == ENOBUFS || errno == EAGAIN || errno == EINTR) {
                errors++;
                continue;
            }
            die("sendmmsg to %s: %s", dst, strerror(errno));
        }
        sent += done;
        seq += done;
    }
    double seconds = (clock_ns(CLOCK_MONOTONIC) - start) / 1e9;
    printf("{\"sent\": %llu, \"errors\": %llu, \"seconds\": ", (unsigned long long)sent, (unsigned long long)errors);
    put_double(seconds);
    printf(", \"calls\": %llu, \"pps\": ", (unsigned long long)calls);
    put_double(seconds ? sent / seconds : 0.0);
    fputs(", \"mbps\": ", stdout);
    put_double(seconds ? sent * size * 8 / seconds / 1e6 : 0.0);
    printf(", \"size\": %lld, \"target_pps\": ", size);
    put_double(rate);
    printf(", \"flows\": %d}\n", nkeys);
    fflush(stdout);
    return 0;
}

/* --- the sink ----------------------------------------------------------------------------- */

/* Packets per flow: open addressing, a key is flow + 1 (0 is an empty slot). */
struct flows { uint64_t *keys, *counts; size_t capacity, used; };

static uint64_t *flow_counter(struct flows *f, uint32_t flow)
{
    uint64_t key = (uint64_t)flow + 1;
    size_t mask = f->capacity - 1, i = (flow * 2654435761u) & mask;
    while (f->keys[i] && f->keys[i] != key)
        i = (i + 1) & mask;
    if (f->keys[i])
        return &f->counts[i];
    if ((f->used + 1) * 2 > f->capacity) {   /* grow, then look again */
        struct flows bigger = {calloc(f->capacity * 2, 8), calloc(f->capacity * 2, 8), f->capacity * 2, 0};
        if (!bigger.keys || !bigger.counts)
            die("out of memory");
        for (size_t j = 0; j < f->capacity; j++)
            if (f->keys[j])
                *flow_counter(&bigger, f->keys[j] - 1) = f->counts[j];
        free(f->keys);
        free(f->counts);
        *f = bigger;
        return flow_counter(f, flow);
    }
    f->keys[i] = key;
    f->used++;
    return &f->counts[i];
}

static int compare_int64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* loadgen.percentiles of the samples (ns) in microseconds: count, min, max, mean and p50, p99,
 * p99.9 by nearest rank.  Sorts the samples. */
static void put_percentiles(int64_t *samples, size_t n)
{
    static const struct { double p; const char *name; } points[] = {{50, "p50"}, {99, "p99"}, {99.9, "p99.9"}};
    if (!n) {
        fputs("{\"count\": 0}", stdout);
        return;
    }
    qsort(samples, n, sizeof *samples, compare_int64);
    double sum = 0;
    for (size_t i = 0; i < n; i++)
        sum += samples[i] / 1000.0;
    printf("{\"count\": %zu, \"min\": ", n);
    put_double(samples[0] / 1000.0);
    fputs(", \"max\": ", stdout);
    put_double(samples[n - 1] / 1000.0);
    fputs(", \"mean\": ", stdout);
    put_double(sum / n);
    for (size_t k = 0; k < sizeof points / sizeof *points; k++) {
        double rank = ceil(points[k].p * n / 100.0 - 1e-9) - 1;
        size_t index = rank < 0 ? 0 : rank > n - 1 ? n - 1 : (size_t)rank;
        printf(", \"%s\": ", points[k].name);
        put_double(samples[index] / 1000.0);
    }
    fputc('}', stdout);
}

static volatile sig_atomic_t stop_requested;

static void request_stop(int signum) { (void)signum; stop_requested = 1; }

struct sink {
    int fd, batch, latency;
    unsigned char *buffer, *control;
    struct iovec *iov;
    struct mmsghdr *msgs;
};

/* One recvmmsg: the number of packets now in the buffer (0 after the 50 ms timeout). */
static int sink_receive(struct sink *s)
{
    if (s->latency)   /* recvmmsg overwrote the control lengths */
        for (int i = 0; i < s->batch; i++)
            s->msgs[i].msg_hdr.msg_controllen = SINK_CONTROL;
    int n = recvmmsg(s->fd, s->msgs, s->batch, MSG_WAITFORONE, NULL);
    if (n < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            die("recvmmsg: %s", strerror(errno));
        return 0;
    }
    return n;
}

/* The kernel's receive time of packet i (SO_TIMESTAMPNS), in ns, or -1. */
static int64_t arrival_ns(struct sink *s, int i)
{
    struct msghdr *h = &s->msgs[i].msg_hdr;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(h); c; c = CMSG_NXTHDR(h, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS) {
            struct timespec ts;
            memcpy(&ts, CMSG_DATA(c), sizeof ts);
            return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
        }
    return -1;
}

static int sink_main(int argc, char **argv)
{
    int latency = 0;
    long long batch = 256, run = 0;
    double max_seconds = 600, quiet = 0.2, drain_max = 10.0;
    struct option options[] = {
        {"--latency", FLAG, &latency}, {"--batch", INT, &batch}, {"--max-seconds", FLOAT, &max_seconds},
        {"--run", INT, &run}, {"--quiet", FLOAT, &quiet}, {"--drain-max", FLOAT, &drain_max}, {NULL, 0, NULL}};
    parse_options(argc, argv, options);
    if (batch < 1 || batch > MAX_BATCH)
        die("batch %lld outside 1..%d", batch, MAX_BATCH);
    if (run < 0 || run > 0xFFFFFFFFLL)
        die("--run must fit in 32 bits");

    struct sigaction action = {.sa_handler = request_stop};   /* no SA_RESTART: recvmmsg returns */
    sigaction(SIGUSR1, &action, NULL);
    sigaction(SIGTERM, &action, NULL);

    struct sink s = {.batch = batch, .latency = latency};
    s.fd = socket(AF_INET, SOCK_RAW, IPPROTO_GRE_);
    if (s.fd < 0)
        die("a raw GRE socket needs root/CAP_NET_RAW: %s", strerror(errno));
    int rcvbuf = RCVBUF, one = 1;
    struct timeval timeout = {0, RCVTIMEO_US};
    if (setsockopt(s.fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf) < 0
        || setsockopt(s.fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout) < 0
        || (latency && setsockopt(s.fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one) < 0))
        die("socket options: %s", strerror(errno));
    s.buffer = malloc((size_t)SINK_SLOT * batch);
    s.control = malloc((size_t)SINK_CONTROL * batch);
    s.iov = calloc(batch, sizeof *s.iov);
    s.msgs = calloc(batch, sizeof *s.msgs);
    if (!s.buffer || !s.control || !s.iov || !s.msgs)
        die("out of memory");
    for (int i = 0; i < batch; i++) {
        s.iov[i].iov_base = s.buffer + (size_t)i * SINK_SLOT;
        s.iov[i].iov_len = SINK_SLOT;
        s.msgs[i].msg_hdr.msg_iov = &s.iov[i];
        s.msgs[i].msg_hdr.msg_iovlen = 1;
        if (latency)
            s.msgs[i].msg_hdr.msg_control = s.control + (size_t)i * SINK_CONTROL;
    }

    /* Drain: discard until nothing came for `quiet` s (at most drain_max s). */
    double drain_start = monotonic(), drain_last = drain_start, drain_seconds;
    uint64_t drained = 0;
    int drain_quiet;
    for (;;) {
        int n = sink_receive(&s);
        double now = monotonic();
        if (n) {
            drained += n;
            drain_last = now;
        }
        drain_quiet = now - drain_last >= quiet;
        if (drain_quiet || now - drain_start >= drain_max) {
            drain_seconds = now - drain_start;
            break;
        }
    }
    printf("ready {\"drained\": %llu, \"seconds\": ", (unsigned long long)drained);
    put_double(drain_seconds);
    printf(", \"quiet\": %s}\n", drain_quiet ? "true" : "false");
    fflush(stdout);

    /* Count until asked to stop (or max_seconds), then until the path is quiet again. */
    double deadline = monotonic() + max_seconds, stopping = -1, heard = monotonic();
    uint64_t received = 0, other = 0, stale = 0, bytes = 0, highest = 0;
    int64_t first = 0, last = 0;
    struct flows flows = {calloc(64, 8), calloc(64, 8), 64, 0};
    size_t nsamples = 0, capacity = latency ? 1 << 16 : 0;
    int64_t *samples = latency ? malloc(capacity * sizeof *samples) : NULL;
    if (!flows.keys || !flows.counts || (latency && !samples))
        die("out of memory");
    for (;;) {
        if (stopping < 0 && (stop_requested || monotonic() > deadline))
            stopping = monotonic();
        if (stopping >= 0) {
            double now = monotonic();
            if (now - heard >= quiet || now - stopping >= drain_max)
                break;
        }
        int n = sink_receive(&s);
        if (!n)
            continue;
        heard = monotonic();
        int64_t now = clock_ns(CLOCK_REALTIME);
        if (!first)
            first = now;
        last = now;
        if (latency && nsamples + n > capacity) {
            capacity = capacity * 2 + n;
            if (!(samples = realloc(samples, capacity * sizeof *samples)))
                die("out of memory");
        }
        for (int i = 0; i < n; i++) {
            const unsigned char *p = s.buffer + (size_t)i * SINK_SLOT;
            unsigned length = s.msgs[i].msg_len < SINK_SLOT ? s.msgs[i].msg_len : SINK_SLOT;
            unsigned ihl = (p[0] & 0x0F) * 4;
            if (length < ihl + 8) {
                other++;
                continue;
            }
            const unsigned char *gre = p + ihl;
            unsigned start = 8 + (gre[0] & 0x10 ? 4 : 0) + (gre[1] & 0x80 ? 4 : 0);  /* sequence, ack */
            const unsigned char *probe = gre + start;
            if (length < ihl + start + PROBE_SIZE || memcmp(probe, MAGIC, 4) != 0) {
                other++;
                continue;
            }
            if (get32(probe + 4) != run) {
                stale++;
                continue;
            }
            uint64_t seq = get64(probe + 12);
            received++;
            bytes += get16(p + 2);
            ++*flow_counter(&flows, get32(probe + 8));
            if (seq > highest)
                highest = seq;
            if (latency) {
                int64_t arrived = arrival_ns(&s, i);
                if (arrived >= 0)
                    samples[nsamples++] = arrived - (int64_t)get64(probe + 20);
            }
        }
    }

    uint64_t per_flow_min = 0;
    int64_t flow_min = -1, flow_max = -1;
    for (size_t j = 0; j < flows.capacity; j++) {
        if (!flows.keys[j])
            continue;
        int64_t flow = flows.keys[j] - 1;
        if (flow_min < 0 || flows.counts[j] < per_flow_min)
            per_flow_min = flows.counts[j];
        if (flow_min < 0 || flow < flow_min)
            flow_min = flow;
        if (flow > flow_max)
            flow_max = flow;
    }
    printf("{\"received\": %llu, \"other\": %llu, \"stale\": %llu, \"bytes\": %llu, \"highest_seq\": %llu, "
           "\"flows\": %zu, \"per_flow_min\": %llu, ", (unsigned long long)received, (unsigned long long)other,
           (unsigned long long)stale, (unsigned long long)bytes, (unsigned long long)highest, flows.used,
           (unsigned long long)per_flow_min);
    if (flow_min < 0)
        fputs("\"flow_min\": null, \"flow_max\": null", stdout);
    else
        printf("\"flow_min\": %lld, \"flow_max\": %lld", (long long)flow_min, (long long)flow_max);
    fputs(", \"tail_seconds\": ", stdout);
    put_double(stopping >= 0 ? monotonic() - stopping : 0.0);
    fputs(", \"seconds\": ", stdout);
    put_double(first && last != first ? (last - first) / 1e9 : 0.0);
    if (latency) {
        fputs(", \"latency_us\": ", stdout);
        put_percentiles(samples, nsamples);
    }
    printf(", \"drain\": {\"drained\": %llu, \"seconds\": ", (unsigned long long)drained);
    put_double(drain_seconds);
    printf(", \"quiet\": %s}}\n", drain_quiet ? "true" : "false");
    fflush(stdout);
    return 0;
}

/* --- for the tests: the constants, and the percentiles of samples read from stdin -------- */

static int constants_main(void)
{
    printf("{\"magic\": \"%.4s\", \"ip_header\": %d, \"gre_header\": %d, \"probe_size\": %d, "
           "\"min_size\": %d, \"max_size\": %d, \"link_mtu\": %d, \"sndbuf\": %d, \"rcvbuf\": %d, "
           "\"sink_slot\": %d, \"sink_control\": %d, \"max_batch\": %d, \"rcvtimeo_us\": %d, "
           "\"probe_offset\": %d, \"per_packet_offset\": %d}\n",
           (const char *)MAGIC, IP_HEADER, GRE_HEADER, PROBE_SIZE, MIN_SIZE, MAX_SIZE, LINK_MTU, SNDBUF, RCVBUF,
           SINK_SLOT, SINK_CONTROL, MAX_BATCH, RCVTIMEO_US, OFF_MAGIC, OFF_CALL);
    return 0;
}

static int percentiles_main(void)
{
    size_t n = 0, capacity = 1024;
    int64_t *samples = malloc(capacity * sizeof *samples);
    long long v;
    while (samples && scanf("%lld", &v) == 1) {
        if (n == capacity)
            samples = realloc(samples, (capacity *= 2) * sizeof *samples);
        if (samples)
            samples[n++] = v;
    }
    if (!samples)
        die("out of memory");
    put_percentiles(samples, n);
    fputc('\n', stdout);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && (strcmp(argv[1], "send") == 0 || strcmp(argv[1], "sink") == 0)) {
        char name[16];   /* as loadgen.py names itself: a profile tells send from sink, C or not */
        snprintf(name, sizeof name, "loadgen-%s", argv[1]);
        prctl(PR_SET_NAME, name, 0, 0, 0);
    }
    if (argc >= 2 && strcmp(argv[1], "send") == 0)
        return send_main(argc - 2, argv + 2);
    if (argc >= 2 && strcmp(argv[1], "sink") == 0)
        return sink_main(argc - 2, argv + 2);
    if (argc == 2 && strcmp(argv[1], "constants") == 0)
        return constants_main();
    if (argc == 2 && strcmp(argv[1], "percentiles") == 0)
        return percentiles_main();
    die("usage: loadgen send|sink [options] (the options of python -m benchmarks.loadgen)");
    return 2;
}
