/* The loop (declared in loop.h; docs/fastpath.md step 5): Twisted's poll in C, for as long
 * as only native fds are ready.  Compiled in one unit after pump.c, whose functions it calls.
 *
 * A capture wake-up here is GREPort.doRead with the native pump, step for step: the pump
 * calls of _pump (FlowTable.begin's sweep and the link's room, rp_pcap_pump, FlowTable.end's
 * write through MuxConnection.writeNative), then the mux's held flush (its unsent ceiling)
 * and the sojourn gate's observe.  Whatever the Python path would do differently from the
 * common case (a frame handed back, a write the socket did not take whole, the gate's head
 * too old, the link over maxSendBuffer) returns to Python with the turn's state, and Python
 * goes on from there with its own code (routeproxy.loop).
 */
#include <errno.h>
#include <math.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include "loop.h"

#define LOOP_EVENTS 16   /* (statics here are loop_*: one unit with the other files) */
#define SIOCOUTQNSD 0x894B   /* linux/sockios.h: unsent bytes in the send queue */

static double loop_clock_seconds(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Without the deadline's timer (rp_loop_timer_open failed), one clock read per poll: the
 * wall clock (the capture's receive times, the link's last read) is the monotonic reading
 * plus an offset taken again every 100 ms, so a step of the wall clock is followed within
 * that; where a clock read is a system call (UML: ~17 us) this halves the loop's calls. */
#define LOOP_OFFSET_AGE 0.1
static double loop_wall_offset;
static double loop_wall_offset_at = -1.0;

static double loop_wall(double mono)
{
    if (loop_wall_offset_at < 0.0 || mono - loop_wall_offset_at > LOOP_OFFSET_AGE
            || mono < loop_wall_offset_at) {
        loop_wall_offset = loop_clock_seconds(CLOCK_REALTIME) - mono;
        loop_wall_offset_at = mono;
    }
    return mono + loop_wall_offset;
}

/* The wake-up's wall clock, read at most once and only when the wake-up needs the time: the
 * gate's age of a read that did not empty the capture, a hand-back to Python.  Where a clock
 * read is a system call (UML: ~17 us; a VM whose clocksource has no vDSO) one per wake-up was
 * a quarter of a wake-up's calls (epoll_wait, the clock, the read, the send). */
static double loop_now(struct rp_loop *l)
{
    if (!l->clock_known) {
        l->clock = loop_clock_seconds(CLOCK_REALTIME);
        l->clock_known = 1;
        l->stats.clock_reads++;
    }
    return l->clock;
}

int rp_loop_timer_open(struct rp_loop *l)
{
    struct epoll_event event;
    int fd;

    if (l->timer_fd >= 0)
        return 0;
    fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (fd < 0)
        return -errno;
    memset(&event, 0, sizeof event);
    event.events = EPOLLIN | EPOLLET;
    event.data.fd = fd;
    if (epoll_ctl(l->epfd, EPOLL_CTL_ADD, fd, &event) < 0) {
        int error = errno;
        close(fd);
        return -error;
    }
    l->timer_fd = fd;
    l->timer_armed = 0;
    return 0;
}

void rp_loop_timer_close(struct rp_loop *l)
{
    if (l->timer_fd < 0)
        return;
    epoll_ctl(l->epfd, EPOLL_CTL_DEL, l->timer_fd, NULL);
    close(l->timer_fd);
    l->timer_fd = -1;
    l->timer_armed = 0;
}

/* The run's deadline: *timeout* s from now, rounded up to the millisecond as Python's
 * epoll.poll rounds (< 0: none).  -1 when the timer cannot be set: the run reads the clock. */
static int loop_timer_arm(struct rp_loop *l, double timeout)
{
    struct itimerspec value;

    memset(&value, 0, sizeof value);
    if (timeout < 0) {
        if (!l->timer_armed)
            return 0;
    } else {
        long ms = (long)ceil(timeout * 1000.0);
        value.it_value.tv_sec = ms / 1000;
        value.it_value.tv_nsec = (ms % 1000) * 1000000L;
    }
    if (timerfd_settime(l->timer_fd, 0, &value, NULL) < 0)
        return -1;
    l->timer_armed = timeout >= 0;
    return 0;
}

/* The timer's event: whether this run's deadline passed.  Setting the timer resets its count,
 * so an edge left by an earlier run's expiry (Twisted's poll ignores the fd) reads nothing. */
static int loop_timer_due(struct rp_loop *l)
{
    uint64_t expirations;

    if (read(l->timer_fd, &expirations, sizeof expirations) != (ssize_t)sizeof expirations)
        return 0;
    l->timer_armed = 0;
    return 1;
}

/* kernelUnsent: what MuxProtocol.sendBufferSize adds to Twisted's buffer (empty here) */
static int64_t loop_kernel_unsent(int fd)
{
    int n = 0;
    if (ioctl(fd, SIOCOUTQNSD, &n) < 0)
        return 0;
    return n;
}

/* MuxConnection._turnUnsent, with nothing pending (Python's entry condition) */
static void loop_turn_unsent(struct rp_loop *l)
{
    struct rp_loop_link *k = &l->link;
    if (k->ceiling < 0 || k->ceiling >= k->watermark) {
        l->turn.unsent = loop_kernel_unsent(k->socket);
        l->turn.asked = 1;
    } else {
        l->turn.unsent = k->ceiling;
        l->turn.asked = 0;
    }
}

/* FlowTable.begin for the one link: the sweep, the gate's threshold (its state in C, which
 * the pump drops with), then the link's room (MuxConnection.greRoom) */
static void loop_pump_begin(struct rp_loop *l, double drop_before)
{
    struct rp_loop_link *k = &l->link;
    k->calls++;
    if (k->calls >= k->sweep_at) {
        if (k->begun && !(k->seen > k->calls - k->idle_calls))
            k->begun = 0;
        k->sweep_at = k->calls + k->idle_calls;
    }
    rp_pump_begin(l->pump, drop_before, l->gate);
    if (k->begun) {
        if (l->turn.unsent < 0)
            loop_turn_unsent(l);
        l->turn.flush_held = 1;
        rp_pump_begin_link(l->pump, k->index, k->watermark - l->turn.unsent, !l->turn.asked,
                           k->max_payload);
    }
}

/* FlowTable.end's write of the link's frames (MuxConnection.writeNative): 0, or -1 when the
 * socket or TLS did not take them all (turn.rest / turn.unwritten: Python's to queue). */
static int loop_pump_write(struct rp_loop *l, uint64_t delivered_before)
{
    struct rp_loop_link *k = &l->link;
    uint32_t link, frames;
    size_t length, taken, rest_length;
    const uint8_t *out, *rest;
    int result, send_errno;

    if (rp_pump_delivered(l->pump) != delivered_before)
        k->seen = k->calls;   /* _foldFlows: a frame of the link (framed or dropped) */
    out = rp_pump_out(l->pump, 0, &link, &length, &frames);
    if (out == NULL)
        return 0;
    l->stats.framed += frames;
    result = rp_tls_send(k->tls, out, length, &taken, &rest, &rest_length, &send_errno);
    if (taken == length) {
        l->stats.written += frames;
        l->stats.frames_out += frames;
    }
    l->stats.bytes_out += taken;
    l->turn.unsent += (int64_t)(taken + taken / 512);
    l->turn.wrote = 1;
    if (rest_length == 0 && result == RP_TLS_SENT && taken == length)
        return 0;
    l->turn.rest = rest;
    l->turn.rest_length = rest_length;
    l->turn.error = send_errno;
    l->turn.tls_failed = result != RP_TLS_SENT;
    if (taken != length) {
        l->turn.unwritten = out + taken;
        l->turn.unwritten_length = length - taken;
        l->turn.unwritten_frames = frames;
    }
    return -1;
}

/* MuxConnection.flush at the turn's end, after a wake-up of only native writes: the ceiling.
 * -1: over maxSendBuffer (Python drops the link). */
static int loop_flush(struct rp_loop *l)
{
    struct rp_loop_link *k = &l->link;
    int64_t ceiling;
    if (!l->turn.flush_held)
        return 0;
    if (!l->turn.wrote) {
        k->ceiling = l->turn.unsent;
        return 0;
    }
    ceiling = l->turn.unsent + 64;
    if (ceiling > k->max_send_buffer) {
        ceiling = loop_kernel_unsent(k->socket);
        if (ceiling > k->max_send_buffer) {
            k->ceiling = ceiling;
            return -1;
        }
    }
    k->ceiling = ceiling;
    return 0;
}

/* MuxConnection._roomAfterAsking, in C, for a frame the pump handed back over the link's
 * room (RP_BACK_BUDGET: the room was the ceiling carried over, the link not asked yet): the
 * frames before it written, the link is asked once (Twisted's buffer is empty while C
 * loops: the kernel's unsent bytes are all of it) and the frame goes through the pump again,
 * in a call of its own against the room that leaves, taken or dropped (counted as the
 * watermark's) as the Python path would.  An overload then stays in C: a hand-back per
 * wake-up had sent each one's rest, and the turns after it, to Python.  1 when it did so
 * (turn.back is then what the pump handed back again, or NULL); 0 when it is not such a
 * hand-back; -1 when the socket did not take the frames before it (the turn's rest is set,
 * the frame still handed back): Python goes on with both, as for any hand-back. */
static int loop_room_after_asking(struct rp_loop *l, uint64_t delivered)
{
    struct rp_loop_turn *t = &l->turn;
    struct rp_loop_link *k = &l->link;
    const uint8_t *back = t->back;
    size_t back_length = t->back_length;
    double back_ts = t->back_ts;

    if (!k->begun || t->asked || rp_pump_back_reason(l->pump) != RP_BACK_BUDGET)
        return 0;
    t->back = NULL;
    if (loop_pump_write(l, delivered) < 0) {   /* the socket did not take them: Python's */
        t->back = back;
        return -1;
    }
    t->unsent = loop_kernel_unsent(k->socket);
    t->asked = 1;
    loop_pump_begin(l, rp_pump_drop_before(l->pump));   /* (the gate's threshold as it stands) */
    if (rp_pump_frame_again(l->pump, back, back_length, back_ts, back_ts != 0.0) != RP_PUMP_TAKEN) {
        t->back = back;   /* (no room in the pump's buffer, say): Python's, as before */
        t->back_length = back_length;
        t->back_ts = back_ts;
    }
    return 1;
}

/* One capture wake-up (GREPort.doRead with _pump): 0 when it ended here, else a result.  A
 * wake-up that emptied the capture has no standing queue (CoDel): its head counts as young,
 * and the clock is not read. */
static int loop_capture_read(struct rp_loop *l)
{
    struct rp_loop_turn *t = &l->turn;
    struct rp_gate *gate = l->gate;
    int budget = l->budget;
    int emptied = 0;
    /* a gate in C that stands (dropping, or its head over target) is asked at every wake-up,
     * as GREPort._wakeUp asks it: the wake-up's clock, its threshold, its observe at the end */
    int standing = gate != NULL && (gate->dropping || gate->above_since >= 0.0);
    double drop_before = standing ? rp_gate_drop_before(gate, loop_now(l)) : 0.0;

    l->stats.reads++;
    memset(t, 0, sizeof *t);
    t->unsent = -1;
    while (budget > 0) {
        uint64_t delivered = rp_pump_delivered(l->pump);
        double head;
        int n, retried;

        loop_pump_begin(l, drop_before);
        n = l->pcap != NULL
            ? rp_pcap_pump(l->pcap, l->pump, budget, &t->back, &t->back_length, &t->back_ts, t->err)
            : rp_rawcap_pump(l->rawcap, l->pump, budget, &t->back, &t->back_length, &t->back_ts,
                             t->err);
        if (n < 0) {
            t->capture_error = 1;
            return RP_LOOP_CAPTURE;
        }
        retried = t->back != NULL ? loop_room_after_asking(l, delivered) : 0;
        if (gate != NULL)
            drop_before = rp_pump_drop_before(l->pump);   /* moved by the drops it made */
        if (retried < 0 || loop_pump_write(l, delivered) < 0 || t->back != NULL) {
            if (rp_pump_head(l->pump, &head)) {
                t->has_head = 1;
                t->head = head;
            }
            if (t->back == NULL && n < budget) {
                budget = n;   /* _pump breaks after this call */
                emptied = 1;
            }
            t->budget = budget - n;
            t->now = loop_now(l);
            if (emptied && t->has_head)
                t->head = t->now;   /* Python observes it: young, as here */
            return RP_LOOP_CAPTURE;
        }
        if (rp_pump_head(l->pump, &head)) {
            t->has_head = 1;
            t->head = head;
        }
        if (n < budget && !retried) {   /* (retried: a hand-back, not an empty capture, ended it) */
            emptied = 1;
            break;
        }
        budget -= n;
    }
    if (loop_flush(l) < 0) {
        t->now = loop_now(l);
        if (emptied && t->has_head)
            t->head = t->now;   /* Python observes it: young, as here */
        return RP_LOOP_SLOW_PEER;
    }
    /* _wakeUp's observe; with the gate idle and the head young (or the capture emptied) it
     * changes nothing, and the clock is not read for it */
    if (gate != NULL
            && (standing || (t->has_head && !emptied && loop_now(l) - t->head >= gate->target)))
        rp_gate_observe(gate, loop_now(l), !t->has_head ? 0.0 : emptied ? loop_now(l) : t->head);
    return 0;
}

/* One readable wake-up of the link's socket (NativeTLSReader.doRead's first rp_link_read):
 * 0 when it only sent GRE (and took plaintext), else RP_LOOP_LINK. */
static int loop_link_read(struct rp_loop *l)
{
    struct rp_loop_read *r = &l->read;
    r->flags = rp_link_read(r->link, r->tls, 1, 0, r->max_payload, &r->out, &r->out_length,
                            &r->info, l->clock_known ? l->clock : 0.0);
    l->stats.clock_reads += (uint64_t)r->info.clock_read;
    if (r->flags || r->out_length)
        return RP_LOOP_LINK;
    l->stats.link_reads++;
    l->stats.plaintext += r->info.plaintext;
    /* when its bytes arrived (the gate's stamps), else now */
    l->stats.last_read = r->info.received_at > 0.0 ? r->info.received_at : loop_now(l);
    return 0;
}

int rp_loop_run(struct rp_loop *l, double timeout)
{
    struct epoll_event events[LOOP_EVENTS];
    int timed = l->timer_fd >= 0;
    double mono = 0.0, deadline = 0.0;

    if (timeout == 0.0)
        return RP_LOOP_TIMEOUT;
    if (timed && loop_timer_arm(l, timeout) < 0)
        timed = 0;
    if (!timed) {
        mono = loop_clock_seconds(CLOCK_MONOTONIC);
        l->stats.clock_reads++;
        deadline = mono + (timeout < 0 ? 0.0 : timeout);
    }
    for (;;) {
        int wait_ms = -1, due = 0;
        int n, i, result;

        if (!timed && timeout >= 0) {
            double left = deadline - mono;
            if (left <= 0)
                return RP_LOOP_TIMEOUT;
            wait_ms = (int)ceil(left * 1000.0);   /* as Python's epoll.poll rounds */
        }
        l->stats.polls++;
        n = epoll_wait(l->epfd, events, LOOP_EVENTS, wait_ms);
        if (n < 0) {
            if (errno == EINTR)
                return RP_LOOP_SIGNAL;
            l->turn.error = errno;
            return RP_LOOP_ERROR;
        }
        if (n == 0)
            return RP_LOOP_TIMEOUT;
        for (i = 0; i < n; i++) {
            if (events[i].data.fd == l->timer_fd) {
                due = timed && loop_timer_due(l);
                continue;
            }
            if (events[i].events != EPOLLIN
                || (events[i].data.fd != l->capture_fd && events[i].data.fd != l->read.fd))
                return RP_LOOP_OTHER;   /* before any is handled: Twisted polls again */
        }
        l->clock_known = 0;
        if (!timed) {   /* the wake-up's time, and the next poll's: the reads here are short */
            mono = loop_clock_seconds(CLOCK_MONOTONIC);
            l->stats.clock_reads++;
            l->clock = loop_wall(mono);
            l->clock_known = 1;
        }
        for (i = 0; i < n; i++) {   /* in the order Twisted would dispatch them */
            if (events[i].data.fd == l->timer_fd)
                continue;
            result = events[i].data.fd == l->capture_fd ? loop_capture_read(l)
                                                        : loop_link_read(l);
            if (result)
                return result;
        }
        if (due)
            return RP_LOOP_TIMEOUT;
    }
}
