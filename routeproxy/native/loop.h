/* The loop (docs/fastpath.md step 5): the reactor's poll in C, in the reactor's own thread;
 * the declarations, also cffi's cdef.
 *
 * rp_loop_run waits on Twisted's own epoll fd and handles a readable native capture itself
 * (the wake-up GREPort.doRead/_pump makes, with the same C calls: rp_pcap_pump, the link's
 * watermark room as MuxConnection.greRoom computes it, rp_tls_send as writeNative, the
 * flush's unsent ceiling), and a readable link socket whose reads are C's (the wake-up
 * NativeTLSReader.doRead makes: rp_link_read, when it only sends GRE), over and over,
 * without entering Python.  It returns as soon as
 * anything needs Python: another fd ready, the reactor's next timer due, a frame handed
 * back, the socket not taking a whole write, the gate's head too old, a signal.  Python never
 * runs meanwhile, so every condition Python checked at entry (routeproxy.loop) still holds;
 * only kernel state changes, which C checks itself.  Counters accumulate here (and in the
 * pump's state) and Python folds them on return.
 */

/* rp_loop_run's results */
#define RP_LOOP_TIMEOUT 0      /* the timeout passed: the reactor's timers are due */
#define RP_LOOP_OTHER 1        /* a fd C does not handle is ready (or an event not a plain
                                * read): the rest is Twisted's dispatch */
#define RP_LOOP_SIGNAL 2       /* epoll_wait was interrupted: Python's signal handlers run */
#define RP_LOOP_CAPTURE 3      /* a capture wake-up stopped part way: Python goes on (turn) */
/* 4: was RP_LOOP_GATE, a wake-up's end for Python's gate to observe; the loop asks the gate
 * in C itself (sojourn.NativeGate, the only gate a native capture has) */
#define RP_LOOP_SLOW_PEER 5    /* the flush found the link over maxSendBuffer: Python drops it */
#define RP_LOOP_LINK 6         /* the link's TLS read gave more than GRE C sent (frames for
                                * Python, EOF, an error, TLS to send...): read.flags and the
                                * rest, as NativeTLSReader.doRead goes on after rp_link_read */
#define RP_LOOP_ERROR -1       /* epoll_wait failed (errno in turn.error) */

/* The capture's mux link, as the Python path sees it at entry (FlowTable._live and the
 * MuxConnection's state); C keeps it as the Python path would and Python copies it back. */
struct rp_loop_link {
    int begun;              /* in FlowTable._live: its room is asked per pump call */
    uint32_t index;         /* its link index in the pump */
    int64_t watermark;      /* MuxConfig.greWatermark */
    int64_t max_send_buffer;
    int64_t max_payload;    /* MuxConnection.maxOutPayload */
    int64_t ceiling;        /* MuxConnection._unsentCeiling; -1: None */
    int socket;             /* the link's TCP socket (its unsent bytes: SIOCOUTQNSD) */
    struct rp_tls *tls;     /* its TLS write (NativeTLSWriter's state) */
    uint64_t calls;         /* FlowTable._calls, _sweepAt, idleCalls, _seen[index] */
    uint64_t sweep_at;
    uint64_t idle_calls;
    uint64_t seen;
};

/* A capture wake-up handed to Python part way (RP_LOOP_CAPTURE), or its end
 * (RP_LOOP_SLOW_PEER): what Python needs to go on exactly where C stopped. */
struct rp_loop_turn {
    double now;             /* its wall-clock time (the gate's now) */
    int has_head;
    double head;            /* capture time of the last frame C took */
    int flush_held;         /* greRoom was asked: the mux's flush is held for the turn's end */
    int64_t unsent;         /* the turn's sample (MuxConnection._unsent), grown by writes */
    int asked;              /* _unsentAsked */
    int wrote;              /* _wroteNative */
    int budget;             /* what _pump goes on with after the hand-back (0: it stops) */
    const uint8_t *back;    /* the frame handed back (NULL: none), its length and time */
    size_t back_length;
    double back_ts;
    int capture_error;      /* rp_pcap_pump failed: err says why */
    char err[256];
    const uint8_t *rest;    /* records the socket did not take: Twisted's queue, in order */
    size_t rest_length;
    int tls_failed;         /* rp_tls_send did not return RP_TLS_SENT: its write BIO drained */
    const uint8_t *unwritten;   /* frames SSL_write refused: queueFrames, after the rest */
    size_t unwritten_length;
    uint32_t unwritten_frames;  /* the frames of the pump call (counted with the rest) */
    int error;              /* errno of RP_LOOP_ERROR, or the socket error of a send */
};

/* The link's TLS read (NativeTLSReader's), when C may make it. */
struct rp_loop_read {
    int fd;                 /* the link's socket; -1: its reads are not C's now */
    struct rp_link *link;   /* the LinkReader's state, its TLS read's, the decoder's limit */
    struct rp_tls_in *tls;
    uint32_t max_payload;
    int flags;              /* RP_LOOP_LINK: rp_link_read's flags, bytes for Python, info */
    const uint8_t *out;
    size_t out_length;
    struct rp_read_info info;
};

/* Counters since Python last folded them (it zeroes them). */
struct rp_loop_stats {
    uint64_t polls;         /* epoll_wait calls */
    uint64_t reads;         /* capture wake-ups (GREStats.reads) */
    uint64_t framed;        /* FlowTable.framed, .written */
    uint64_t written;
    uint64_t frames_out;    /* MuxStats.framesOut, .bytesOut */
    uint64_t bytes_out;
    uint64_t link_reads;    /* link socket wake-ups read in C (NativeTLSReader.reads) */
    uint64_t plaintext;     /* their plaintext bytes (MuxStats.bytesIn) */
    double last_read;       /* the wall-clock time of the last (MuxConnection._lastReceived) */
    uint64_t clock_reads;   /* clock reads: only where a wake-up needs the time */
};

struct rp_loop {
    int epfd;               /* Twisted's epoll */
    int capture_fd;         /* the native capture's fd; -1: none */
    struct rp_pcap *pcap;   /* it: libpcap's ring (native), else the raw socket (native-raw) */
    struct rp_rawcap *rawcap;
    struct rp_pump *pump;
    int budget;             /* GREPort.maxPacketsPerRead */
    struct rp_gate *gate;   /* the capture's sojourn gate (sojourn.NativeGate's state): the
                             * loop drops with it and observes it, in any state; NULL: none */
    struct rp_loop_link link;
    struct rp_loop_read read;
    struct rp_loop_turn turn;
    struct rp_loop_stats stats;
    int timer_fd;           /* the deadline's timerfd in epfd (rp_loop_timer_open); -1: none,
                             * the clock is read at every wake-up for the deadline instead */
    int timer_armed;
    int clock_known;        /* the wake-up's wall clock was read: clock */
    double clock;
};

/* Until something needs Python (the results above); timeout in seconds, < 0: none. */
int rp_loop_run(struct rp_loop *l, double timeout);
/* The run's deadline as a timerfd in epfd (edge-triggered: Twisted's own poll, which ignores
 * fds it does not know, meets a late expiry once): a wake-up then needs no clock read to know
 * whether the reactor's timers are due.  0, or -errno (timer_fd stays -1). */
int rp_loop_timer_open(struct rp_loop *l);
void rp_loop_timer_close(struct rp_loop *l);
