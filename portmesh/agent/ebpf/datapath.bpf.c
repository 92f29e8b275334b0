/* portmesh eBPF datapath: the OVS pipeline (docs/pipeline.md) as three tc ingress programs, all in
 * section "tc" (libbpf 1.1 knows no "tc/<name>" sections) and told apart by function name:
 *
 *   tc/container  pm_from_container  host end of every container veth: anti-spoofing, ARP and
 *                                    ping answers, fence, delivery by mapping, the way out
 *   tc/uplink     pm_from_uplink     a gateway host's uplink: frames for the public pools
 *   tc/tunnel     pm_from_tunnel     VXLAN devices to other hosts: delivery only (split horizon)
 *
 * The maps (datapath.h) are pinned by name, so a reloaded object keeps every entry. Everything the
 * program cannot place is dropped and counted in `drops`, by reason.
 *
 * Checksums: frames built here (RST, port unreachable) carry a full checksum. A frame from a local
 * container may still be CHECKSUM_PARTIAL; such an answer only goes back into that container, where
 * the kernel trusts it without checking, so that is harmless.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "datapath.h"

#ifndef AF_INET
#define AF_INET 2
#endif
/* linux/icmp.h pulls in glibc's socket headers, which do not build for the bpf target. */
#define ICMP_ECHOREPLY 0
#define ICMP_DEST_UNREACH 3
#define ICMP_PORT_UNREACH 3
#define ICMP_ECHO 8
#define ICMP_TIME_EXCEEDED 11
struct icmphdr {
    __u8 type;
    __u8 code;
    __sum16 checksum;
    union {
        struct {
            __be16 id;
            __be16 sequence;
        } echo;
        __be32 gateway;
    } un;
};
#define ARPOP_REQUEST 1
#define ARPOP_REPLY 2
#define IP_DF_MF_OFFSET 0x3fff /* MF flag and fragment offset: any fragment */

/* PM_NO_REDIRECT_PEER builds a variant that delivers with plain bpf_redirect (benchmark only). */
#ifdef PM_NO_REDIRECT_PEER
#define PM_USE_PEER 0
#else
#define PM_USE_PEER 1
#endif

char LICENSE[] SEC("license") = "GPL";

/* ---- maps ---------------------------------------------------------------------------------- */

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct pm_config);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} config SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, PM_MAX_PORTS);
    __type(key, __u32);
    __type(value, struct pm_port);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} ports SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, PM_MAX_PUBLIC_IPS);
    __type(key, struct pm_owned_ip);
    __type(value, __u8);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} owned_ips SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, PM_MAX_MAPPINGS);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __type(key, struct pm_mapping_key);
    __type(value, struct pm_dest);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} mappings SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LPM_TRIE);
    __uint(max_entries, PM_MAX_BLOCKS);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __type(key, struct pm_block_key);
    __type(value, struct pm_dest);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} blocks SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, PM_MAX_MACS);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __type(key, struct pm_mac_key);
    __type(value, struct pm_dest);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} macs SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LPM_TRIE);
    __uint(max_entries, PM_MAX_NETWORKS);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __type(key, struct pm_net_key);
    __type(value, __u32);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} networks SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, PM_MAX_PUBLIC_IPS);
    __type(key, __be32);
    __type(value, __u32);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} public_ips SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_HASH);
    __uint(max_entries, PM_MAX_MAPPINGS);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __type(key, struct pm_mapping_key);
    __type(value, struct pm_counter);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} mapping_stats SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, PM_DROP_MAX);
    __type(key, __u32);
    __type(value, struct pm_counter);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} drops SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, PM_MAX_ECHO);
    __type(key, struct pm_echo_key);
    __type(value, struct pm_dest);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} echo SEC(".maps");

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

/* ---- lookups --------------------------------------------------------------------------------- */

static __always_inline __u32 network_kind(__be32 ip)
{
    struct pm_net_key key = { .prefixlen = 32, .ip = ip };
    __u32 *kind = bpf_map_lookup_elem(&networks, &key);

    return kind ? *kind : 0;
}

static __always_inline int is_public_ip(__be32 ip)
{
    return bpf_map_lookup_elem(&public_ips, &ip) != NULL;
}

/* Who holds (ip, port, proto): an exact mapping first, else the block the port falls in. *hit_mapping
 * says which, as only mappings have counters. */
static __always_inline struct pm_dest *find_dest(__be32 ip, __be16 port, __u8 proto, int *hit_mapping)
{
    struct pm_mapping_key mkey = { .ip = ip, .port = port, .proto = proto };
    struct pm_block_key bkey = { .prefixlen = 48, .ip = ip, .port = port };
    struct pm_dest *dest = bpf_map_lookup_elem(&mappings, &mkey);

    *hit_mapping = dest != NULL;
    if (dest)
        return dest;
    return bpf_map_lookup_elem(&blocks, &bkey);
}

static __always_inline void count_mapping(struct __sk_buff *skb, __be32 ip, __be16 port, __u8 proto)
{
    struct pm_mapping_key key = { .ip = ip, .port = port, .proto = proto };
    struct pm_counter *c = bpf_map_lookup_elem(&mapping_stats, &key);

    /* The agent creates the entry with the mapping: a missing one is not ours to make. */
    if (c) {
        c->packets++;
        c->bytes += skb->len;
    }
}

/* ---- sending ---------------------------------------------------------------------------------- */

/* Hand the frame to dest: into a local container, or into the tunnel device to its host.
 * A local container gets it by bpf_redirect_peer (every program here runs at tc ingress): straight
 * to its eth0's ingress, skipping the host end's egress and the veth's backlog queue (see
 * tests/ebpf/test_program_bench.py; -DPM_NO_REDIRECT_PEER builds the plain bpf_redirect variant). */
static __always_inline int send_to(struct __sk_buff *skb, struct pm_dest *dest, struct pm_config *cfg)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    __u32 ifindex = dest->ifindex;

    if ((void *)(eth + 1) > data_end)
        return TC_ACT_SHOT;
    mac_copy(eth->h_dest, dest->mac);
    mac_copy(eth->h_source, cfg->gateway_mac);
    if (PM_USE_PEER && (dest->flags & PM_DEST_LOCAL))
        return bpf_redirect_peer(ifindex, 0);
    return bpf_redirect(ifindex, 0);
}

/* Send the frame back out of the port it came in, MACs swapped (answers built in place). */
static __always_inline int send_back(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    __u8 tmp[6];

    if ((void *)(eth + 1) > data_end)
        return TC_ACT_SHOT;
    mac_copy(tmp, eth->h_dest);
    mac_copy(eth->h_dest, eth->h_source);
    mac_copy(eth->h_source, tmp);
    return bpf_redirect(skb->ifindex, 0);
}

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

struct unreach_frame {
    __u8 align[2];
    struct ethhdr eth;
    struct iphdr ip;
    struct icmphdr icmp;
    struct iphdr quoted_ip;
    __u8 quoted_l4[8];
};

/* ICMP port unreachable for a UDP datagram, quoting its IP header and 8 bytes, sent from the
 * address the datagram was for. */
static __always_inline int answer_port_unreachable(struct __sk_buff *skb, struct pkt *p)
{
    void *data_end = (void *)(long)skb->data_end;
    struct unreach_frame f = {};

    if (p->l4 + 8 > data_end)
        return TC_ACT_SHOT;
    mac_copy(f.eth.h_dest, p->eth->h_source);
    mac_copy(f.eth.h_source, p->eth->h_dest);
    f.eth.h_proto = bpf_htons(ETH_P_IP);
    __builtin_memcpy(&f.quoted_ip, p->ip, sizeof(f.quoted_ip));
    __builtin_memcpy(f.quoted_l4, p->l4, 8);
    f.icmp.type = ICMP_DEST_UNREACH;
    f.icmp.code = ICMP_PORT_UNREACH;
    f.icmp.checksum = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&f.icmp, 8 + sizeof(struct iphdr) + 8, 0));
    ip_reply_header(&f.ip, p->ip->daddr, p->ip->saddr, IPPROTO_ICMP, FRAME_LEN(f) - sizeof(f.eth));
    if (bpf_skb_change_tail(skb, FRAME_LEN(f), 0) ||
        bpf_skb_store_bytes(skb, 0, &f.eth, FRAME_LEN(f), 0))
        return TC_ACT_SHOT;
    return bpf_redirect(skb->ifindex, 0);
}

/* ---- delivery by mapping (all three programs) ---------------------------------------------------- */

static __always_inline int is_icmp_error(__u8 type)
{
    return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED;
}

/* The IP header an ICMP error quotes (plain 20 bytes, with the 8 bytes after it), or NULL. */
static __always_inline struct iphdr *quoted_ip(struct __sk_buff *skb, struct pkt *p)
{
    struct iphdr *q = p->l4 + sizeof(struct icmphdr);

    if ((void *)(q + 1) + 8 > (void *)(long)skb->data_end || q->ihl != 5)
        return NULL;
    return q;
}

static __always_inline struct pm_dest *find_echo(__be32 public_ip, __be32 remote, __be16 id)
{
    struct pm_echo_key key = { .public_ip = public_ip, .remote = remote, .id = id };

    return bpf_map_lookup_elem(&echo, &key);
}

/* Who sent the packet an ICMP error quotes: the holder of its source (address, port), or for a
 * quoted echo request whoever sent it. The quoted source must be the address the error is for. */
static __always_inline struct pm_dest *quoted_sender(struct __sk_buff *skb, struct pkt *p)
{
    struct iphdr *q = quoted_ip(skb, p);
    __be16 *ports;
    int hit_mapping;

    if (!q || q->saddr != p->ip->daddr)
        return NULL;
    ports = (void *)(q + 1);
    if (q->protocol == IPPROTO_TCP || q->protocol == IPPROTO_UDP)
        return find_dest(q->saddr, ports[0], q->protocol, &hit_mapping);
    if (q->protocol == IPPROTO_ICMP && ((struct icmphdr *)ports)->type == ICMP_ECHO)
        return find_echo(q->saddr, q->daddr, ((struct icmphdr *)ports)->un.echo.id);
    return NULL;
}

/* An ICMP echo reply or error for a public IP: to whoever sent the request (echo map) or the packet
 * the error quotes (mappings, then blocks: PMTU discovery and refusals reach the container). */
static __always_inline int deliver_icmp(struct __sk_buff *skb, struct pkt *p, struct pm_config *cfg)
{
    struct icmphdr *icmp = icmp_of(skb, p);
    struct pm_dest *dest = NULL;

    if (icmp && icmp->type == ICMP_ECHOREPLY)
        dest = find_echo(p->ip->daddr, p->ip->saddr, icmp->un.echo.id);
    else if (icmp && is_icmp_error(icmp->type))
        dest = quoted_sender(skb, p);
    if (!dest)
        return count_drop(skb, PM_DROP_ICMP);
    return send_to(skb, dest, cfg);
}

/* A frame for an address of a public pool: to the mapping's or block's holder, else refused the way
 * a closed port refuses (RST / port unreachable) -- promptly, not by silence. Echo requests to a
 * public IP in use are answered here. */
static __always_inline int deliver_pool(struct __sk_buff *skb, struct pkt *p, struct pm_config *cfg)
{
    __u8 proto = p->ip->protocol;
    struct pm_dest *dest;
    int hit_mapping;

    if (proto == IPPROTO_ICMP) {
        struct icmphdr *icmp = icmp_of(skb, p);

        if (icmp && icmp->type == ICMP_ECHO)
            return is_public_ip(p->ip->daddr) ? answer_echo(skb, p) : count_drop(skb, PM_DROP_ICMP);
        return deliver_icmp(skb, p, cfg);
    }
    if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
        return count_drop(skb, PM_DROP_REFUSED);
    dest = find_dest(p->ip->daddr, p->dport, proto, &hit_mapping);
    if (dest) {
        if (hit_mapping)
            count_mapping(skb, p->ip->daddr, p->dport, proto);
        return send_to(skb, dest, cfg);
    }
    count_drop(skb, PM_DROP_REFUSED);
    return proto == IPPROTO_TCP ? answer_rst(skb, p) : answer_port_unreachable(skb, p);
}

/* ---- the outside world ------------------------------------------------------------------------- */

/* A router's hop, as the host's own forwarding would count it (ip_decrease_ttl). */
static __always_inline void decrease_ttl(struct __sk_buff *skb)
{
    struct iphdr *ip = (void *)(long)skb->data + sizeof(struct ethhdr);

    if ((void *)(ip + 1) > (void *)(long)skb->data_end)
        return;
    ip->check = csum_replace16(ip->check, bpf_htons(ip->ttl << 8), bpf_htons((ip->ttl - 1) << 8));
    ip->ttl--;
}

/* A gateway host sends a container's frame out by its own routing; a local destination (the host
 * itself) is fenced: containers never reach the host's sockets. */
static __always_inline int route_out(struct __sk_buff *skb, struct pkt *p)
{
    struct bpf_fib_lookup fib = {};
    struct ethhdr *eth;
    void *data_end;
    long rc;

    if (p->ip->ttl <= 1)
        return count_drop(skb, PM_DROP_NO_ROUTE); /* no "time exceeded" from here (yet) */
    fib.family = AF_INET;
    fib.tos = p->ip->tos;
    fib.l4_protocol = p->ip->protocol;
    fib.sport = p->sport;
    fib.dport = p->dport;
    /* tot_len stays 0: the helper then checks the skb against the MTU itself, GSO-aware. Given the
     * IP length, a 64 KB TSO packet from a container would be FRAG_NEEDED and bulk uploads stall. */
    fib.ipv4_src = p->ip->saddr;
    fib.ipv4_dst = p->ip->daddr;
    fib.ifindex = skb->ifindex;
    rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
    if (rc == BPF_FIB_LKUP_RET_NOT_FWDED || rc == BPF_FIB_LKUP_RET_BLACKHOLE ||
        rc == BPF_FIB_LKUP_RET_UNREACHABLE || rc == BPF_FIB_LKUP_RET_PROHIBIT)
        return count_drop(skb, rc == BPF_FIB_LKUP_RET_NOT_FWDED ? PM_DROP_FENCE : PM_DROP_NO_ROUTE);
    /* FRAG_NEEDED included: no ICMP "fragmentation needed" is sent from here (yet). */
    if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
        return count_drop(skb, PM_DROP_NO_ROUTE);
    if (fib.ifindex == skb->ifindex)
        return count_drop(skb, PM_DROP_NO_ROUTE); /* never back into the port it came from */
    decrease_ttl(skb);
    if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
        return bpf_redirect_neigh(fib.ifindex, 0, 0, 0); /* the kernel resolves the next hop */
    eth = (void *)(long)skb->data;
    data_end = (void *)(long)skb->data_end;
    if ((void *)(eth + 1) > data_end)
        return TC_ACT_SHOT;
    mac_copy(eth->h_dest, fib.dmac);
    mac_copy(eth->h_source, fib.smac);
    return bpf_redirect(fib.ifindex, 0);
}

/* To the outside world: by this host's routing on a gateway, else through the tunnel to the gateway. */
static __always_inline int send_outside(struct __sk_buff *skb, struct pkt *p, struct pm_config *cfg)
{
    struct ethhdr *eth = p->eth;

    if (cfg->flags & PM_CFG_GATEWAY)
        return route_out(skb, p);
    if (!cfg->gateway_tunnel)
        return count_drop(skb, PM_DROP_NO_ROUTE);
    mac_copy(eth->h_dest, cfg->gateway_mac);
    return bpf_redirect(cfg->gateway_tunnel, 0);
}

/* ---- from a container ----------------------------------------------------------------------------- */

static __always_inline int owns_ip(__u32 ifindex, __be32 ip)
{
    struct pm_owned_ip key = { .ifindex = ifindex, .ip = ip };

    return bpf_map_lookup_elem(&owned_ips, &key) != NULL;
}

/* ARP from a container: only about itself (sha = its MAC, spa = one of its IPs), and only asking for
 * the gateway (answered with the gateway MAC) or a pool address (the virtual MAC, so sharers of an
 * IP never answer for each other: all their traffic goes through the program). */
static __always_inline int container_arp(struct __sk_buff *skb, struct pm_port *port, struct pm_config *cfg)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    struct arp_eth *arp = (void *)(eth + 1);
    const __u8 *mac;
    __be32 asked;

    if ((void *)(arp + 1) > data_end)
        return count_drop(skb, PM_DROP_SPOOF_ARP);
    if (arp->htype != bpf_htons(1) || arp->ptype != bpf_htons(ETH_P_IP) || arp->hlen != 6 || arp->plen != 4)
        return count_drop(skb, PM_DROP_SPOOF_ARP);
    if (!mac_eq(arp->sha, port->mac) || !owns_ip(skb->ifindex, arp->spa))
        return count_drop(skb, PM_DROP_SPOOF_ARP);
    if (arp->op != bpf_htons(ARPOP_REQUEST))
        return count_drop(skb, PM_DROP_NOT_IP);
    asked = arp->tpa;
    if (asked == cfg->gateway_ip)
        mac = cfg->gateway_mac;
    else if (network_kind(asked) == PM_NET_POOL)
        mac = cfg->virtual_mac;
    else
        return count_drop(skb, PM_DROP_NOT_IP);
    arp->op = bpf_htons(ARPOP_REPLY);
    mac_copy(arp->tha, arp->sha);
    arp->tpa = arp->spa;
    mac_copy(arp->sha, mac);
    arp->spa = asked;
    mac_copy(eth->h_dest, eth->h_source);
    mac_copy(eth->h_source, mac);
    return bpf_redirect(skb->ifindex, 0);
}

/* The container may send from this TCP/UDP port: a mapping or block of its own holds it. */
static __always_inline int owns_port(struct pkt *p, struct pm_port *port)
{
    int hit_mapping;
    struct pm_dest *dest = find_dest(p->ip->saddr, p->sport, p->ip->protocol, &hit_mapping);

    return dest && dest->owner == port->owner;
}

/* An echo request leaving for elsewhere: remember who sent it, so the reply (or an error quoting
 * it) finds the way back: a local port, or the tunnel a compute host's container sent it through. */
static __always_inline void remember_echo(struct pkt *p, struct icmphdr *icmp, const __u8 *mac, __u16 flags,
                                          __u32 ifindex, __u32 owner)
{
    struct pm_echo_key key = { .public_ip = p->ip->saddr, .remote = p->ip->daddr, .id = icmp->un.echo.id };
    struct pm_dest dest = { .flags = flags, .ifindex = ifindex, .owner = owner };

    mac_copy(dest.mac, mac);
    bpf_map_update_elem(&echo, &key, &dest, BPF_ANY);
}

/* An ICMP error a container may send is about a packet it received: the quoted packet was sent
 * to one of its IPs and to a port it owns (as the OVS pipeline's controller checks it). */
static __always_inline int owns_quoted(struct __sk_buff *skb, struct pkt *p, struct pm_port *port)
{
    struct iphdr *q = quoted_ip(skb, p);
    struct pm_dest *dest;
    __be16 *ports;
    int hit_mapping;

    if (!q || !owns_ip(skb->ifindex, q->daddr) || q->daddr != p->ip->saddr)
        return 0;
    if (q->protocol != IPPROTO_TCP && q->protocol != IPPROTO_UDP)
        return 0;
    ports = (void *)(q + 1);
    dest = find_dest(q->daddr, ports[1], q->protocol, &hit_mapping);
    return dest && dest->owner == port->owner;
}

/* ICMP a container may send: echo requests (remembered), echo replies, and errors about packets
 * it received. Returns 0 if allowed. */
static __always_inline int check_container_icmp(struct __sk_buff *skb, struct pkt *p, struct pm_port *port)
{
    struct icmphdr *icmp = icmp_of(skb, p);

    if (!icmp)
        return -1;
    if (icmp->type == ICMP_ECHOREPLY)
        return 0;
    if (is_icmp_error(icmp->type))
        return owns_quoted(skb, p, port) ? 0 : -1;
    if (icmp->type != ICMP_ECHO)
        return -1;
    remember_echo(p, icmp, port->mac, PM_DEST_LOCAL, skb->ifindex, port->owner);
    return 0;
}

/* The source checks of an IPv4 frame from a container: its IP, its port, allowed ICMP. */
static __always_inline int check_container_source(struct __sk_buff *skb, struct pkt *p, struct pm_port *port)
{
    __u8 proto = p->ip->protocol;

    if (!owns_ip(skb->ifindex, p->ip->saddr))
        return PM_DROP_SPOOF_IP;
    if (proto == IPPROTO_TCP || proto == IPPROTO_UDP)
        return owns_port(p, port) ? -1 : PM_DROP_SPOOF_PORT;
    if (proto == IPPROTO_ICMP)
        return check_container_icmp(skb, p, port) ? PM_DROP_ICMP : -1;
    return PM_DROP_ICMP; /* other protocols: nothing maps them */
}

/* Where the destination lies decides: fenced, answered here, delivered by mapping, or out. */
static __always_inline int container_ipv4(struct __sk_buff *skb, struct pkt *p, struct pm_config *cfg)
{
    __u32 kind = network_kind(p->ip->daddr);

    if (kind == PM_NET_PROTECTED)
        return count_drop(skb, PM_DROP_FENCE);
    if (kind == PM_NET_LINK_LOCAL) {
        struct icmphdr *icmp = icmp_of(skb, p);

        if (p->ip->daddr == cfg->gateway_ip && icmp && icmp->type == ICMP_ECHO)
            return answer_echo(skb, p);
        return count_drop(skb, PM_DROP_FENCE);
    }
    if (kind == PM_NET_POOL)
        return deliver_pool(skb, p, cfg);
    return send_outside(skb, p, cfg);
}

static __always_inline int from_container(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    __u32 ifindex = skb->ifindex;
    struct pm_config *cfg = get_config();
    struct pm_port *port = bpf_map_lookup_elem(&ports, &ifindex);
    struct pkt p;
    int reason;

    if (!port || !cfg)
        return count_drop(skb, PM_DROP_UNKNOWN_PORT);
    if ((void *)(eth + 1) > data_end)
        return count_drop(skb, PM_DROP_NOT_IP);
    if (!mac_eq(eth->h_source, port->mac))
        return count_drop(skb, PM_DROP_SPOOF_MAC);
    if (eth->h_proto == bpf_htons(ETH_P_ARP))
        return container_arp(skb, port, cfg);
    if (eth->h_proto != bpf_htons(ETH_P_IP) || parse_ipv4(skb, &p))
        return count_drop(skb, PM_DROP_NOT_IP);
    reason = check_container_source(skb, &p, port);
    if (reason >= 0)
        return count_drop(skb, reason);
    return container_ipv4(skb, &p, cfg);
}

/* ---- from the uplink ------------------------------------------------------------------------------- */

static __always_inline int from_uplink(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = (void *)(eth + 1);
    struct pm_config *cfg = get_config();
    struct pkt p;

    /* ARP, IPv6 and the rest are the host's own business. */
    if (!cfg || (void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
        return TC_ACT_OK;
    if (network_kind(ip->daddr) != PM_NET_POOL)
        return TC_ACT_OK;
    /* For a pool but not a plain unfragmented header: dropped here, never left to the host's
     * routing (which has no route to the pools and would send it somewhere else). */
    if (parse_ipv4(skb, &p))
        return count_drop(skb, PM_DROP_NOT_IP);
    return deliver_pool(skb, &p, cfg);
}

/* ---- from a tunnel ---------------------------------------------------------------------------------- */

/* Frames from another host were classified where they entered the cloud: deliver them, never
 * re-classify, never send them into another tunnel (split horizon). */
static __always_inline int from_tunnel(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    struct pm_config *cfg = get_config();
    struct pm_mac_key key = {};
    struct icmphdr *icmp;
    struct pm_dest *dest;
    struct pkt p;
    __u32 kind;

    if (!cfg || (void *)(eth + 1) > data_end)
        return count_drop(skb, PM_DROP_TUNNEL);
    mac_copy(key.mac, eth->h_dest);
    dest = bpf_map_lookup_elem(&macs, &key);
    if (dest && (dest->flags & PM_DEST_LOCAL)) {
        if (PM_USE_PEER)
            return bpf_redirect_peer(dest->ifindex, 0);
        return bpf_redirect(dest->ifindex, 0);
    }
    if (!(cfg->flags & PM_CFG_GATEWAY) || !mac_eq(eth->h_dest, cfg->gateway_mac))
        return count_drop(skb, PM_DROP_TUNNEL);
    if (eth->h_proto != bpf_htons(ETH_P_IP) || parse_ipv4(skb, &p))
        return count_drop(skb, PM_DROP_NOT_IP);
    kind = network_kind(p.ip->daddr);
    if (kind == PM_NET_PROTECTED || kind == PM_NET_LINK_LOCAL)
        return count_drop(skb, PM_DROP_FENCE);
    if (kind == PM_NET_POOL)
        return count_drop(skb, PM_DROP_TUNNEL); /* the sending host delivers pool traffic itself */
    icmp = icmp_of(skb, &p);
    if (icmp && icmp->type == ICMP_ECHO)
        remember_echo(&p, icmp, eth->h_source, PM_DEST_TUNNEL, skb->ifindex, 0);
    return route_out(skb, &p);
}

SEC("tc")
int pm_from_container(struct __sk_buff *skb)
{
    pull_headers(skb);
    return from_container(skb);
}

SEC("tc")
int pm_from_uplink(struct __sk_buff *skb)
{
    pull_headers(skb);
    return from_uplink(skb);
}

SEC("tc")
int pm_from_tunnel(struct __sk_buff *skb)
{
    pull_headers(skb);
    return from_tunnel(skb);
}
