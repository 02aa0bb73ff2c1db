/* The sojourn gate in C (routeproxy/sojourn.py's SojournGate, its control law step for step;
 * docs/gre-io.md): the declarations, also cffi's cdef.
 *
 * For a queue whose reads C makes without Python: the link's receive queue (link.c), where
 * the gate must not leave C (a gate in Python made every read over its target a Python
 * wake-up, and the slower daemon kept the queue standing).  tests/unit/test_native_sojourn.py
 * holds it to the Python gate on the same sequences. */

struct rp_gate {
    double target;        /* 0: off */
    double interval;
    double ceiling;       /* while dropping, older than this always goes (10x target) */
    int dropping;
    double above_since;   /* when the head first waited longer than target; < 0: not */
    uint64_t episodes;    /* times the gate started dropping */
    uint32_t count;       /* drops in this episode: they set the pace */
    double drop_next;     /* while dropping: when the next drop is due */
    double left_at;       /* when the last episode ended; < 0: none yet */
    double now;           /* the wake-up's time (rp_gate_drop_before) */
};

void rp_gate_init(struct rp_gate *g, double target, double interval);
/* At a wake-up: times older than this are dropped (0.0: none). */
double rp_gate_drop_before(struct rp_gate *g, double now);
/* A packet was dropped: the threshold for the rest of the wake-up. */
double rp_gate_dropped(struct rp_gate *g);
/* After a wake-up: head is the time of the last packet read (0: unknown). */
void rp_gate_observe(struct rp_gate *g, double now, double head);
