/* The sojourn gate in C (sojourn.h): routeproxy.sojourn.SojournGate's methods, one for one,
 * so the two agree to the bit (the test feeds both the same sequences). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "sojourn.h"

void rp_gate_init(struct rp_gate *g, double target, double interval)
{
    memset(g, 0, sizeof *g);
    g->target = target;
    g->interval = interval;
    g->ceiling = 10 * target;
    g->above_since = -1.0;
    g->left_at = -1.0;
}

static double gate_threshold(const struct rp_gate *g)
{
    if (!g->dropping)
        return 0.0;
    return g->now - (g->now >= g->drop_next ? g->target : g->ceiling);
}

double rp_gate_drop_before(struct rp_gate *g, double now)
{
    g->now = now;
    return gate_threshold(g);
}

double rp_gate_dropped(struct rp_gate *g)
{
    if (g->now >= g->drop_next) {
        g->count++;
        g->drop_next += g->interval / sqrt((double)g->count);
    }
    return gate_threshold(g);
}

void rp_gate_observe(struct rp_gate *g, double now, double head)
{
    if (head == 0.0)
        return;
    if (now - head < g->target) {
        g->above_since = -1.0;
        if (g->dropping) {
            g->dropping = 0;
            g->left_at = now;
        }
    } else if (g->above_since < 0.0) {
        g->above_since = now;
    } else if (!g->dropping && now - g->above_since >= g->interval) {
        int recent = g->left_at >= 0.0 && now - g->left_at < 16 * g->interval;
        g->dropping = 1;
        g->episodes++;
        /* RFC 8289: an episode soon after the last one goes on near its pace */
        g->count = recent && g->count > 2 ? g->count - 2 : 0;
        g->drop_next = now;   /* the first drop is due at once */
    }
}
