/* portmesh eBPF datapath: the packet view: parsing, drop counting, MACs, checksums.
 * Included by datapath.bpf.c only, in order (each header uses the ones before it). */
#ifndef PM_PACKET_H
#define PM_PACKET_H

/* ---- packet view ----------------------------------------------------------------------------- */

struct arp_eth {
    __be16 htype;
    __be16 ptype;
    __u8 hlen;
    __u8 plen;
    __be16 op;
    __u8 sha[6];
    __be32 spa;
    __u8 tha[6];
    __be32 tpa;
} __attribute__((packed));

/* The parsed headers of an IPv4 frame with a plain 20-byte header. sport/dport are 0 for ICMP. */
struct pkt {
    struct ethhdr *eth;
    struct iphdr *ip;
    void *l4;
    __be16 sport;
    __be16 dport;
};

static __always_inline int count_drop(struct __sk_buff *skb, __u32 reason)
{
    struct pm_counter *c = bpf_map_lookup_elem(&drops, &reason);

    if (c) {
        c->packets++;
        c->bytes += skb->len;
    }
    return TC_ACT_SHOT;
}

static __always_inline struct pm_config *get_config(void)
{
    __u32 zero = 0;

    return bpf_map_lookup_elem(&config, &zero);
}

static __always_inline int mac_eq(const __u8 *a, const __u8 *b)
{
    return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] && a[5] == b[5];
}

static __always_inline void mac_copy(__u8 *dst, const __u8 *src)
{
    __builtin_memcpy(dst, src, 6);
}

/* Parse Ethernet + IPv4 (+ the L4 ports). Returns 0, or -1 for a frame to drop as NOT_IP
 * (truncated, IP options, fragments: only plain 20-byte unfragmented headers are handled). */
static __always_inline int parse_ipv4(struct __sk_buff *skb, struct pkt *p)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = data + sizeof(*eth);

    if ((void *)(ip + 1) > data_end)
        return -1;
    if (ip->ihl != 5 || ip->version != 4 || (ip->frag_off & bpf_htons(IP_DF_MF_OFFSET)))
        return -1;
    p->eth = eth;
    p->ip = ip;
    p->l4 = ip + 1;
    p->sport = 0;
    p->dport = 0;
    if (ip->protocol == IPPROTO_TCP) {
        struct tcphdr *tcp = p->l4;

        if ((void *)(tcp + 1) > data_end)
            return -1;
        p->sport = tcp->source;
        p->dport = tcp->dest;
    } else if (ip->protocol == IPPROTO_UDP) {
        struct udphdr *udp = p->l4;

        if ((void *)(udp + 1) > data_end)
            return -1;
        p->sport = udp->source;
        p->dport = udp->dest;
    } else if (ip->protocol == IPPROTO_ICMP) {
        if (p->l4 + sizeof(struct icmphdr) > data_end)
            return -1;
    }
    return 0;
}

/* Direct packet access sees only the skb's linear part, and a NIC driver may leave headers in page
 * fragments: make the longest header run read here linear (an ICMP error with its quote) once. */
#define PM_HEADERS_LEN (sizeof(struct ethhdr) + 2 * sizeof(struct iphdr) + sizeof(struct icmphdr) + 8)
static __always_inline void pull_headers(struct __sk_buff *skb)
{
    __u32 want = skb->len < PM_HEADERS_LEN ? skb->len : PM_HEADERS_LEN;

    if ((void *)(long)skb->data + want > (void *)(long)skb->data_end)
        bpf_skb_pull_data(skb, want);
}

/* The ICMP header, or NULL if the frame is not that long. Checked again at each use: the verifier
 * does not always carry parse_ipv4's bound across the helpers in between. */
static __always_inline struct icmphdr *icmp_of(struct __sk_buff *skb, struct pkt *p)
{
    struct icmphdr *icmp = p->l4;

    if (p->ip->protocol != IPPROTO_ICMP || (void *)(icmp + 1) > (void *)(long)skb->data_end)
        return NULL;
    return icmp;
}

static __always_inline __u16 csum_fold(__u64 sum)
{
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return ~sum;
}

/* RFC 1624: a 16-bit word of a checksummed area changed from old to new. */
static __always_inline __u16 csum_replace16(__u16 check, __u16 old, __u16 new)
{
    __u32 sum = (__u16)~check + (__u16)~old + new;

    return csum_fold(sum);
}

#endif
