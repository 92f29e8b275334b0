/* portmesh eBPF datapath: answers built here: echo reply, TCP reset, ICMP errors (rate-limited).
 * Included by datapath.bpf.c only, in order (each header uses the ones before it). */
#ifndef PM_ANSWERS_H
#define PM_ANSWERS_H

/* ---- answers built here ------------------------------------------------------------------------ */

/* An ICMP echo request answered in place: addresses swapped, type 0, checksum adjusted. */
static __always_inline int answer_echo(struct __sk_buff *skb, struct pkt *p)
{
    void *data_end = (void *)(long)skb->data_end;
    struct icmphdr *icmp = p->l4;
    __be32 tmp;

    if ((void *)(icmp + 1) > data_end)
        return TC_ACT_SHOT;
    tmp = p->ip->saddr;
    p->ip->saddr = p->ip->daddr;
    p->ip->daddr = tmp;
    /* Swapping the addresses leaves the IP checksum as it was (a sum does not care about order). */
    icmp->checksum = csum_replace16(icmp->checksum, bpf_htons(ICMP_ECHO << 8), bpf_htons(ICMP_ECHOREPLY << 8));
    icmp->type = ICMP_ECHOREPLY;
    return send_back(skb);
}

static __always_inline void ip_reply_header(struct iphdr *ip, __be32 saddr, __be32 daddr, __u8 proto, __u16 len)
{
    ip->version = 4;
    ip->ihl = 5;
    ip->tos = 0;
    ip->tot_len = bpf_htons(len);
    ip->id = 0;
    ip->frag_off = bpf_htons(0x4000); /* DF, as the kernel sends its RSTs */
    ip->ttl = 64;
    ip->protocol = proto;
    ip->saddr = saddr;
    ip->daddr = daddr;
    ip->check = 0;
    ip->check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)ip, sizeof(*ip), 0));
}

/* Checksum of an L4 segment over IPv4, pseudo header included. */
static __always_inline __u16 l4_csum(__be32 saddr, __be32 daddr, __u8 proto, void *seg, __u32 len)
{
    struct {
        __be32 saddr;
        __be32 daddr;
        __u8 zero;
        __u8 proto;
        __be16 len;
    } pseudo = { .saddr = saddr, .daddr = daddr, .proto = proto, .len = bpf_htons(len) };
    __s64 sum = bpf_csum_diff(0, 0, (__be32 *)&pseudo, sizeof(pseudo), 0);

    return csum_fold((__u32)bpf_csum_diff(0, 0, seg, len, (__u32)sum));
}

/* Frames built on the stack start 2 bytes in, so the IP header is 4-byte aligned (the verifier
 * wants aligned stack access); FRAME_LEN is what goes into the packet. */
struct rst_frame {
    __u8 align[2];
    struct ethhdr eth;
    struct iphdr ip;
    struct tcphdr tcp;
};
#define FRAME_LEN(f) (sizeof(f) - sizeof((f).align))

/* A closed port's answer to a TCP segment, as a kernel would send it (RFC 793 reset generation):
 * with ACK set, seq = its ack and no ACK flag; else seq 0, ack = seq + payload (+1 per SYN/FIN). */
static __always_inline int answer_rst(struct __sk_buff *skb, struct pkt *p)
{
    void *data_end = (void *)(long)skb->data_end;
    struct tcphdr *in = p->l4;
    struct rst_frame f = {};
    __u32 payload;

    if ((void *)(in + 1) > data_end)
        return TC_ACT_SHOT;
    if (in->rst)
        return TC_ACT_SHOT; /* never answer a reset */
    mac_copy(f.eth.h_dest, p->eth->h_source);
    mac_copy(f.eth.h_source, p->eth->h_dest);
    f.eth.h_proto = bpf_htons(ETH_P_IP);
    f.tcp.source = in->dest;
    f.tcp.dest = in->source;
    f.tcp.doff = 5;
    f.tcp.rst = 1;
    if (in->ack) {
        f.tcp.seq = in->ack_seq;
    } else {
        payload = bpf_ntohs(p->ip->tot_len) - sizeof(struct iphdr) - in->doff * 4;
        payload += in->syn + in->fin;
        f.tcp.ack_seq = bpf_htonl(bpf_ntohl(in->seq) + payload);
        f.tcp.ack = 1;
    }
    ip_reply_header(&f.ip, p->ip->daddr, p->ip->saddr, IPPROTO_TCP, sizeof(f.ip) + sizeof(f.tcp));
    f.tcp.check = l4_csum(f.ip.saddr, f.ip.daddr, IPPROTO_TCP, &f.tcp, sizeof(f.tcp));
    if (bpf_skb_change_tail(skb, FRAME_LEN(f), 0) ||
        bpf_skb_store_bytes(skb, 0, &f.eth, FRAME_LEN(f), 0))
        return TC_ACT_SHOT;
    return bpf_redirect(skb->ifindex, 0);
}

struct icmp_error_frame {
    __u8 align[2];
    struct ethhdr eth;
    struct iphdr ip;
    struct icmphdr icmp;
    struct iphdr quoted_ip;
    __u8 quoted_l4[8];
};

#define PM_NSEC 1000000000ULL
/* After this long without errors the bucket is full whatever it held (and (now - stamp) * rate
 * below cannot overflow). */
#define PM_ICMP_FILL_NS (PM_NSEC / PM_ICMP_RATE * PM_ICMP_BURST)

/* Take a token from the ICMP errors' bucket (icmp_limit): 1 if an error may be sent now. Refilled at
 * PM_ICMP_RATE per second up to PM_ICMP_BURST, as Linux's icmp_global_allow; the stamp advances by
 * whole tokens only, so a steady rate just under the limit never loses a fraction. */
static __always_inline int icmp_error_allowed(void)
{
    __u32 zero = 0;
    struct pm_icmp_limit *b = bpf_map_lookup_elem(&icmp_limit, &zero);
    __u64 now = bpf_ktime_get_ns();
    __u64 delta, incr;
    int ok;

    if (!b)
        return 0;
    bpf_spin_lock(&b->lock);
    delta = now - b->stamp;
    if (delta >= PM_ICMP_FILL_NS) {
        b->tokens = PM_ICMP_BURST;
        b->stamp = now;
    } else {
        incr = delta * PM_ICMP_RATE / PM_NSEC;
        if (incr) {
            b->tokens = b->tokens + incr > PM_ICMP_BURST ? PM_ICMP_BURST : b->tokens + incr;
            b->stamp += incr * PM_NSEC / PM_ICMP_RATE;
        }
    }
    ok = b->tokens > 0;
    if (ok)
        b->tokens--;
    bpf_spin_unlock(&b->lock);
    return ok;
}

/* An ICMP error about the frame in ``skb``, built in place and sent back where the frame came from
 * (the container's port, the uplink, or the tunnel to the sender's host): the frame's IP header and
 * 8 bytes quoted, from ``saddr``, MACs swapped. ``rest`` is the header's second word (the next-hop
 * MTU of fragmentation needed, else 0). The frame is counted under ``reason``; over the rate limit
 * nothing is sent and it is counted as ICMP_LIMIT instead. */
static __always_inline int answer_icmp_error(struct __sk_buff *skb, struct pkt *p, __u32 reason, __u8 type,
                                             __u8 code, __be32 rest, __be32 saddr)
{
    void *data_end = (void *)(long)skb->data_end;
    struct icmp_error_frame f = {};

    if (p->l4 + 8 > data_end)
        return count_drop(skb, reason); /* nothing to quote (an ICMP header is parsed, 8 bytes are not) */
    if (!icmp_error_allowed())
        return count_drop(skb, PM_DROP_ICMP_LIMIT);
    count_drop(skb, reason);
    mac_copy(f.eth.h_dest, p->eth->h_source);
    mac_copy(f.eth.h_source, p->eth->h_dest);
    f.eth.h_proto = bpf_htons(ETH_P_IP);
    __builtin_memcpy(&f.quoted_ip, p->ip, sizeof(f.quoted_ip));
    __builtin_memcpy(f.quoted_l4, p->l4, 8);
    f.icmp.type = type;
    f.icmp.code = code;
    f.icmp.un.gateway = rest;
    f.icmp.checksum = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&f.icmp, 8 + sizeof(struct iphdr) + 8, 0));
    ip_reply_header(&f.ip, saddr, p->ip->saddr, IPPROTO_ICMP, FRAME_LEN(f) - sizeof(f.eth));
    if (bpf_skb_change_tail(skb, FRAME_LEN(f), 0) ||
        bpf_skb_store_bytes(skb, 0, &f.eth, FRAME_LEN(f), 0))
        return TC_ACT_SHOT;
    return bpf_redirect(skb->ifindex, 0);
}

/* An unmapped port on a public IP: TCP is reset, anything else gets port unreachable from the
 * address it was sent to. TCP resets share no rate limit, as the kernel's for a closed port: a
 * reset is never larger than the segment it answers (no amplification), and a UDP flood must not
 * silence the refusals of TCP connections. Counted as REFUSED (or ICMP_LIMIT). */
static __always_inline int refuse(struct __sk_buff *skb, struct pkt *p)
{
    if (p->ip->protocol == IPPROTO_TCP) {
        count_drop(skb, PM_DROP_REFUSED);
        return answer_rst(skb, p);
    }
    return answer_icmp_error(skb, p, PM_DROP_REFUSED, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0, p->ip->daddr);
}

#endif
