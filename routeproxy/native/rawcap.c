/* The raw-socket capture (declared in rawcap.h): an unbound raw IPPROTO_GRE socket read
 * with recvmmsg, each packet through rp_pump_frame.  Compiled in one unit after pump.c
 * (build.py), whose pump it feeds; the decisions are all the pump's.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE  /* recvmmsg (Python.h defines it first in the module) */
#endif
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <linux/filter.h>
#include <pcap/pcap.h>

#include "rawcap.h"

#define RAWCAP_SLOTS 64          /* packets per recvmmsg at most */
#define RAWCAP_FILTER_SNAP 262144 /* the filter's "ret #snap" must never trim a datagram */
/* per packet: its receive time and the socket's drop count */
#define RAWCAP_CONTROL (CMSG_SPACE(sizeof(struct timespec)) + CMSG_SPACE(sizeof(uint32_t)))

struct rp_rawcap {
    int fd;
    size_t snaplen;
    int next, count;             /* slots [next, count) are read and not yet pumped */
    uint64_t received;
    uint64_t reads;              /* recvmmsg calls (each a system call: the tests count them) */
    uint32_t dropped;
    uint8_t *buffers;            /* RAWCAP_SLOTS * snaplen */
    struct mmsghdr msgs[RAWCAP_SLOTS];
    struct iovec iov[RAWCAP_SLOTS];
    union {                      /* aligned as a cmsghdr */
        struct cmsghdr align;
        uint8_t bytes[RAWCAP_CONTROL];
    } control[RAWCAP_SLOTS];
};

static void rawcap_error(char *err, const char *what, int code)
{
    snprintf(err, 256, "%s: %s", what, strerror(code));
}

int rp_rawcap_set_filter(struct rp_rawcap *c, const char *filter, char *err)
{
    struct bpf_program program;
    pcap_t *dead;
    int failed;

    if (filter == NULL || !*filter)   /* no program: only our own GRE is kept out */
        return attach_without_own(c->fd, NULL, 0, err);
    dead = pcap_open_dead(DLT_RAW, RAWCAP_FILTER_SNAP);
    if (dead == NULL) {
        snprintf(err, 256, "bad filter: pcap_open_dead failed");
        return -1;
    }
    if (pcap_compile(dead, &program, filter, 1, PCAP_NETMASK_UNKNOWN) < 0) {
        snprintf(err, 256, "bad filter: %s", pcap_geterr(dead));
        pcap_close(dead);
        return -1;
    }
    /* libpcap's instructions are the kernel's struct sock_filter (libpcap attaches them so),
     * behind pump.c's check that drops the GRE our own send sockets marked */
    failed = attach_without_own(c->fd, (const struct sock_filter *)program.bf_insns,
                                program.bf_len, err) < 0;
    pcap_freecode(&program);
    pcap_close(dead);
    return failed ? -1 : 0;
}

struct rp_rawcap *rp_rawcap_open(int snaplen, int buffer_size, const char *filter, char *err)
{
    struct rp_rawcap *c;
    int on = 1;

    if (snaplen <= 0) {
        snprintf(err, 256, "cannot open: snaplen %d", snaplen);
        return NULL;
    }
    c = calloc(1, sizeof *c);
    if (c == NULL || (c->buffers = malloc(RAWCAP_SLOTS * (size_t)snaplen)) == NULL) {
        free(c);
        snprintf(err, 256, "cannot open: out of memory");
        return NULL;
    }
    c->snaplen = (size_t)snaplen;
    for (int i = 0; i < RAWCAP_SLOTS; i++) {
        c->iov[i].iov_base = c->buffers + (size_t)i * c->snaplen;
        c->iov[i].iov_len = c->snaplen;
        c->msgs[i].msg_hdr.msg_iov = &c->iov[i];
        c->msgs[i].msg_hdr.msg_iovlen = 1;
        c->msgs[i].msg_hdr.msg_control = c->control[i].bytes;
    }
    c->fd = socket(AF_INET, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_GRE);
    if (c->fd < 0) {
        rawcap_error(err, errno == EPERM ? "raw GRE sockets need root or CAP_NET_RAW"
                     : "cannot open a raw GRE socket", errno);
        goto fail;
    }
    /* the kernel doubles what it is asked (its bookkeeping) and charges each packet its
     * buffer's true size: half of buffer_size makes the socket hold buffer_size bytes of
     * them, about as many full-size packets as libpcap's ring of that size (not twice as
     * many, which at a standing overload is twice the wait) */
    if (buffer_size > 0)
        buffer_size = buffer_size / 2 > 1024 ? buffer_size / 2 : 1024;
    if (buffer_size > 0
        && setsockopt(c->fd, SOL_SOCKET, SO_RCVBUFFORCE, &buffer_size, sizeof buffer_size) < 0
        && setsockopt(c->fd, SOL_SOCKET, SO_RCVBUF, &buffer_size, sizeof buffer_size) < 0) {
        rawcap_error(err, "cannot set the receive buffer", errno);
        goto fail_fd;
    }
    if (setsockopt(c->fd, SOL_SOCKET, SO_TIMESTAMPNS, &on, sizeof on) < 0) {
        rawcap_error(err, "cannot ask for receive times (SO_TIMESTAMPNS)", errno);
        goto fail_fd;
    }
    setsockopt(c->fd, SOL_SOCKET, SO_RXQ_OVFL, &on, sizeof on);  /* drops: best effort */
    if (rp_rawcap_set_filter(c, filter, err) < 0)
        goto fail_fd;
    /* the socket took every GRE for the host from its creation until the filter was
     * attached: what it holds from then passed no filter (another host's, another port's) */
    while (recv(c->fd, c->buffers, c->snaplen, MSG_DONTWAIT) >= 0)
        ;
    return c;

fail_fd:
    close(c->fd);
fail:
    free(c->buffers);
    free(c);
    return NULL;
}

int rp_rawcap_fileno(struct rp_rawcap *c) { return c->fd; }

void rp_rawcap_stats(struct rp_rawcap *c, uint64_t *received, uint64_t *dropped)
{
    *received = c->received;
    *dropped = c->dropped;
}

int rp_rawcap_pending(struct rp_rawcap *c) { return c->count - c->next; }

uint64_t rp_rawcap_reads(struct rp_rawcap *c) { return c->reads; }

void rp_rawcap_close(struct rp_rawcap *c)
{
    if (c != NULL) {
        close(c->fd);
        free(c->buffers);
        free(c);
    }
}

/* The receive time of message m (0 without one); the drop count it carries, if any. */
static double receive_time(struct rp_rawcap *c, struct msghdr *m)
{
    double ts = 0.0;
    for (struct cmsghdr *h = CMSG_FIRSTHDR(m); h != NULL; h = CMSG_NXTHDR(m, h)) {
        if (h->cmsg_level != SOL_SOCKET)
            continue;
        if (h->cmsg_type == SCM_TIMESTAMPNS) {
            struct timespec t;
            memcpy(&t, CMSG_DATA(h), sizeof t);
            ts = (double)t.tv_sec + (double)t.tv_nsec / 1e9;
        } else if (h->cmsg_type == SO_RXQ_OVFL) {
            memcpy(&c->dropped, CMSG_DATA(h), sizeof c->dropped);
        }
    }
    return ts;
}

int rp_rawcap_pump(struct rp_rawcap *c, struct rp_pump *p, int budget, const uint8_t **back,
                   size_t *back_length, double *back_ts, char *err)
{
    int read = 0;
    int drained = 0;   /* a read came back short: the socket was empty then */

    *back = NULL;
    *back_length = 0;
    *back_ts = 0.0;
    while (read < budget) {
        if (c->next == c->count) {
            /* after a short read, another would find what came since, or EAGAIN: leave that
             * to the next wake-up (the socket stays readable) and save the call */
            if (drained)
                break;
            /* never more than the budget left: what is read beyond a hand-back stays here,
             * and the caller's next calls (budget minus this call's packets) pump it all */
            int want = budget - read < RAWCAP_SLOTS ? budget - read : RAWCAP_SLOTS;
            int n;
            for (int i = 0; i < want; i++)
                c->msgs[i].msg_hdr.msg_controllen = RAWCAP_CONTROL;
            n = recvmmsg(c->fd, c->msgs, (unsigned)want, MSG_DONTWAIT, NULL);
            c->reads++;
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    break;
                rawcap_error(err, "capture failed", errno);
                return -1;
            }
            if (n == 0)
                break;
            c->next = 0;
            c->count = n;
            drained = n < want;
        }
        struct mmsghdr *m = &c->msgs[c->next];
        const uint8_t *packet = c->iov[c->next].iov_base;
        size_t length = m->msg_len < c->snaplen ? m->msg_len : c->snaplen;
        double ts = receive_time(c, &m->msg_hdr);
        c->next++;
        c->received++;
        read++;
        if (rp_pump_frame(p, packet, length, ts, ts != 0.0) == RP_PUMP_HAND_BACK) {
            *back = packet;  /* its slot is not read into again before the next call */
            *back_length = length;
            *back_ts = ts;
            break;
        }
    }
    return read;
}
