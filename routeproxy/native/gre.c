/* routeproxy's native per-packet functions (declared, with their Python twins, in gre.h).
 *
 * Written to be fed bytes from the network: every read is checked against the buffer's
 * length first, lengths are size_t and compared before they are added to offsets, and
 * nothing is allocated or kept between calls.
 */
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "gre.h"

#ifndef RP_SOURCE_DIGEST
#define RP_SOURCE_DIGEST "unknown"
#endif

#define PPP_PROTOCOL 0x880B
#ifndef IPPROTO_GRE /* <netinet/in.h>, when pump.c's <pcap/pcap.h> came first */
#define IPPROTO_GRE 47
#endif
#define IPV4_MIN 20
#define FRAGMENT_BITS 0x3FFF /* MF + fragment offset */

/* routeproxy.gre's first-word bits */
#define FLAG_C 0x8000
#define FLAG_R 0x4000
#define FLAG_K 0x2000
#define FLAG_S 0x1000
#define FLAG_SSR 0x0800
#define RECUR_MASK 0x0700
#define FLAG_A 0x0080
#define FLAGS_MASK 0x0078
#define VERSION_MASK 0x0007
#define GRE_VERSION 1

/* routeproxy.mux.frames */
#define MUX_GRE 0x20
#define MUX_GRE_HAS_SEQ 0x01
#define MUX_GRE_HAS_ACK 0x02

static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint8_t *put16(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
    return p + 2;
}

static uint8_t *put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
    return p + 4;
}

static int fits(int64_t value, int64_t max) { return value >= 0 && value <= max; }

/* Both builders end the same way: the optional seq and ack words, then the payload. */
static int words_fit(int has_seq, int64_t seq, int has_ack, int64_t ack)
{
    return (!has_seq || fits(seq, 0xFFFFFFFF)) && (!has_ack || fits(ack, 0xFFFFFFFF));
}

static long put_words(const uint8_t *out, uint8_t *p, int has_seq, int64_t seq, int has_ack,
                      int64_t ack, const uint8_t *data, size_t length)
{
    if (has_seq)
        p = put32(p, (uint32_t)seq);
    if (has_ack)
        p = put32(p, (uint32_t)ack);
    if (length)
        memcpy(p, data, length);
    return (long)(p - out) + (long)length;
}

/* routeproxy.gre._diagnose: the first thing wrong with a first word, in the same order. */
static int diagnose(uint16_t flags_version)
{
    if ((flags_version & VERSION_MASK) != GRE_VERSION)
        return RP_GRE_NOT_VERSION_1;
    if (flags_version & (FLAG_C | FLAG_R))
        return RP_GRE_CHECKSUM_ROUTING;
    if (!(flags_version & FLAG_K))
        return RP_GRE_KEY_MISSING;
    if (flags_version & (FLAG_SSR | RECUR_MASK))
        return RP_GRE_SOURCE_ROUTE_RECURSION;
    return RP_GRE_RESERVED_FLAGS;
}

int rp_split_gre(const uint8_t *data, size_t size, struct rp_gre *out)
{
    uint16_t flags_version, length;
    size_t start;

    if (size < 8)
        return RP_GRE_TRUNCATED;
    flags_version = get16(data);
    if ((flags_version & ~(FLAG_S | FLAG_A)) != (FLAG_K | GRE_VERSION))
        return diagnose(flags_version);
    if (get16(data + 2) != PPP_PROTOCOL)
        return RP_GRE_NOT_PPP;
    length = get16(data + 4);
    memset(out, 0, sizeof *out);
    out->call_id = get16(data + 6);
    if (flags_version & FLAG_S) {
        start = flags_version & FLAG_A ? 16 : 12;
        if (size < start)
            return RP_GRE_TRUNCATED;
        out->has_seq = 1;
        out->seq = get32(data + 8);
        if (flags_version & FLAG_A) {
            out->has_ack = 1;
            out->ack = get32(data + 12);
        }
        if (length > size - start) /* size >= start: no wrap */
            return RP_GRE_PAYLOAD_TRUNCATED;
        out->payload_offset = start;
        out->payload_length = length;
        return 0;
    }
    if (length)
        return RP_GRE_PAYLOAD_WITHOUT_SEQUENCE;
    start = 8;
    if (flags_version & FLAG_A) {
        if (size < 12)
            return RP_GRE_TRUNCATED;
        out->has_ack = 1;
        out->ack = get32(data + 8);
        start = 12;
    }
    out->payload_offset = start;
    out->payload_length = 0;
    return 0;
}

long rp_build_gre(uint8_t *out, size_t room, int64_t call_id, const uint8_t *payload,
                  size_t length, int has_seq, int64_t seq, int has_ack, int64_t ack)
{
    size_t head = 8u + (has_seq ? 4u : 0u) + (has_ack ? 4u : 0u);
    uint8_t *p = out;

    if (!has_seq && length)
        return RP_GRE_PAYLOAD_WITHOUT_SEQUENCE;
    if (!fits(call_id, 0xFFFF) || length > 0xFFFF || !words_fit(has_seq, seq, has_ack, ack))
        return RP_RANGE;
    if (room < head || length > room - head)
        return RP_NO_ROOM;
    p = put16(p, FLAG_K | GRE_VERSION | (has_seq ? FLAG_S : 0) | (has_ack ? FLAG_A : 0));
    p = put16(p, PPP_PROTOCOL);
    p = put16(p, (uint32_t)length);
    p = put16(p, (uint32_t)call_id);
    return put_words(out, p, has_seq, seq, has_ack, ack, payload, length);
}

long rp_mux_gre_frame(uint8_t *out, size_t room, int64_t session, int64_t call_tag,
                      int has_seq, int64_t seq, int has_ack, int64_t ack,
                      const uint8_t *data, size_t length)
{
    size_t fields = 2u + (has_seq ? 4u : 0u) + (has_ack ? 4u : 0u);
    size_t head = 12 + fields;
    uint8_t *p = out;

    if (!fits(session, 0xFFFFFFFF) || !fits(call_tag, 0xFFFF) || length > 0xFFFFFFFF - fields
        || !words_fit(has_seq, seq, has_ack, ack))
        return RP_RANGE;
    if (room < head || length > room - head || length > (size_t)LONG_MAX - head)
        return RP_NO_ROOM;
    *p++ = MUX_GRE;
    *p++ = (has_seq ? MUX_GRE_HAS_SEQ : 0) | (has_ack ? MUX_GRE_HAS_ACK : 0);
    p = put16(p, 0);
    p = put32(p, (uint32_t)session);
    p = put32(p, (uint32_t)(length + fields));
    p = put16(p, (uint32_t)call_tag);
    return put_words(out, p, has_seq, seq, has_ack, ack, data, length);
}

int rp_ipv4_gre(const uint8_t *frame, size_t size, size_t link_length, long type_at,
                const uint8_t *type_value, size_t type_length, struct rp_ipv4 *out)
{
    const uint8_t *ip;
    size_t header_length, total;

    if (type_at >= 0) {
        size_t at = (size_t)type_at;
        if (at > size || type_length > size - at || memcmp(frame + at, type_value, type_length))
            return RP_IPV4_NOT_IPV4;
    }
    if (link_length > size || size - link_length < IPV4_MIN)
        return RP_IPV4_TRUNCATED;
    ip = frame + link_length;
    header_length = (size_t)(ip[0] & 0x0F) * 4;
    total = get16(ip + 2);
    if (ip[0] >> 4 != 4)
        return RP_IPV4_NOT_IPV4;
    if (header_length < IPV4_MIN || total < header_length)
        return RP_IPV4_BAD_HEADER;
    if (ip[9] != IPPROTO_GRE)
        return RP_IPV4_NOT_GRE;
    if (total > size - link_length) /* Ethernet pads short frames: the IP length rules */
        return RP_IPV4_TRUNCATED;
    out->gre_offset = link_length + header_length;
    out->gre_length = total - header_length;
    memcpy(out->src, ip + 12, 4);
    memcpy(out->dst, ip + 16, 4);
    out->total = (uint16_t)total;
    out->ident = get16(ip + 4);
    out->fragment = get16(ip + 6);
    out->checksum = get16(ip + 10);
    if (out->fragment & FRAGMENT_BITS)
        return RP_IPV4_FRAGMENT;
    return total == header_length ? RP_IPV4_EMPTY : RP_IPV4_GRE;
}

const char *rp_source_digest(void) { return RP_SOURCE_DIGEST; }
