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
 * The parts live in headers beside this file, one job each, included in this order: maps.h (the
 * map declarations), packet.h (parsing, drop counters, checksums), lookup.h (map lookups, sending),
 * answers.h (echo / RST / ICMP errors built here, rate-limited), balance.h (firewall and backend choice of
 * balanced / filtered mappings), deliver.h (delivery by mapping), route.h
 * (the outside world). This file keeps the three programs.
 *
 * Checksums: frames built here (RST, ICMP errors) carry a full checksum. The frame answered may still
 * be CHECKSUM_PARTIAL (a local container's, or one GRO'd by a VXLAN device; a tc program cannot clear
 * that); the answer only goes back where it came from: into that container, where the kernel trusts
 * it without checking, or into the tunnel to the sender's host, which delivers it the same way
 * (tested over the lab's VXLAN: the quote arrives intact). A device that completed the inner
 * checksum on the way would write into the answer's body.
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
#define ICMP_FRAG_NEEDED 4
#define ICMP_ECHO 8
#define ICMP_TIME_EXCEEDED 11
#define ICMP_EXC_TTL 0
#define IP_DF 0x4000
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

#include "maps.h"
#include "packet.h"
#include "lookup.h"
#include "answers.h"
#include "balance.h"
#include "deliver.h"
#include "route.h"

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

    if (dest && hit_mapping && (dest->flags & PM_DEST_BALANCED)) {
        struct pm_mapping_key mkey = { .ip = p->ip->saddr, .port = p->sport, .proto = p->ip->protocol };

        return backend_owns(&mkey, port);
    }
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
    if (dest && hit_mapping && (dest->flags & PM_DEST_BALANCED)) {
        struct pm_mapping_key mkey = { .ip = q->daddr, .port = ports[1], .proto = q->protocol };

        return backend_owns(&mkey, port);
    }
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
    return route_out(skb, &p, cfg);
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
