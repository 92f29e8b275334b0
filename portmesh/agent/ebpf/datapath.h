/* portmesh eBPF datapath: the maps' layout, shared by datapath.bpf.c and layout.py.
 *
 * layout.py mirrors every struct here field for field (ctypes); a test compares
 * the sizes with the BTF of the compiled object, so the two cannot drift apart.
 * Addresses and ports are in network byte order (as they sit in the packet);
 * everything else is host order. All maps are pinned by name under the agent's
 * bpffs directory, so an agent restart reuses them and traffic keeps flowing.
 */
#ifndef PORTMESH_DATAPATH_H
#define PORTMESH_DATAPATH_H

#include <linux/types.h>

#define PM_MAX_PORTS 65536      /* container ports per host */
#define PM_MAX_MAPPINGS 262144
#define PM_MAX_BLOCKS 65536
#define PM_MAX_MACS 131072
#define PM_MAX_NETWORKS 1024
#define PM_MAX_PUBLIC_IPS 65536
#define PM_MAX_ECHO 16384

/* config (ARRAY, one entry, key 0): what the whole host's program needs to know. */
#define PM_CFG_GATEWAY 1 /* this host is a gateway: outside traffic leaves by its own routing (fib) */
struct pm_config {
    __u8 gateway_mac[6];   /* the containers' next hop (answers ARP for gateway_ip) */
    __u8 virtual_mac[6];   /* ARP answer for every public IP */
    __be32 gateway_ip;     /* 169.254.1.1 */
    __u32 gateway_tunnel;  /* compute host: ifindex of the tunnel device to its gateway host; 0 otherwise */
    __u32 flags;           /* PM_CFG_* */
};

/* ports (HASH, key __u32 ifindex of a container port's host end). */
struct pm_port {
    __u8 mac[6];  /* the container's MAC: the only source MAC the port may send */
    __u16 pad;
    __u32 owner;  /* owner id = this ifindex: what pm_dest.owner names */
};

/* owned_ips (HASH, key struct pm_owned_ip, value __u8 1): the IPs a port may send from. */
struct pm_owned_ip {
    __u32 ifindex;
    __be32 ip;
};

/* Where a frame goes: value of mappings, blocks and macs. */
#define PM_DEST_LOCAL 1   /* ifindex is a container port on this host */
#define PM_DEST_TUNNEL 2  /* ifindex is the tunnel device to the container's host */
struct pm_dest {
    __u8 mac[6];    /* the destination container's MAC (eth_dst is set to it) */
    __u16 flags;    /* PM_DEST_* */
    __u32 ifindex;  /* where the frame leaves */
    __u32 owner;    /* local owner id (its port's ifindex) or 0 for a container on another host */
};

/* mappings (HASH pm_mapping_key -> pm_dest): (public ip, proto, port) -> container, exact. */
struct pm_mapping_key {
    __be32 ip;
    __be16 port;
    __u8 proto;  /* IPPROTO_TCP / IPPROTO_UDP */
    __u8 pad;
};

/* blocks (LPM_TRIE pm_block_key -> pm_dest): a container's aligned ephemeral block on each of its
 * IPs, for TCP and UDP alike. prefixlen = 32 + (16 - log2(block size)). */
struct pm_block_key {
    __u32 prefixlen;
    __be32 ip;
    __be16 port;
    __u16 pad;  /* never part of the prefix */
};

/* macs (HASH pm_mac_key -> pm_dest): L2 table, every container MAC of the cloud (local or remote). */
struct pm_mac_key {
    __u8 mac[6];
    __u16 pad;
};

/* networks (LPM_TRIE pm_net_key -> __u32 kind): how a destination address is treated. */
#define PM_NET_POOL 1       /* a public pool: mapped, or refused */
#define PM_NET_PROTECTED 2  /* management / underlay: never reached from a container */
#define PM_NET_LINK_LOCAL 3 /* 169.254.0.0/16: only the gateway address itself */
struct pm_net_key {
    __u32 prefixlen;
    __be32 ip;
};

/* public_ips (HASH __be32 -> __u32 1): the public IPs in use; ARP and ICMP echo are answered for them. */

/* mapping_stats (PERCPU_HASH pm_mapping_key -> pm_counter): packets/bytes delivered through a mapping;
 * the agent creates the entry with the mapping, the program only adds. */
struct pm_counter {
    __u64 packets;
    __u64 bytes;
};

/* drops (PERCPU_ARRAY __u32 reason -> pm_counter). */
enum pm_drop_reason {
    PM_DROP_UNKNOWN_PORT = 0, /* frame from a port the maps do not know */
    PM_DROP_SPOOF_MAC = 1,
    PM_DROP_SPOOF_IP = 2,
    PM_DROP_SPOOF_PORT = 3,   /* TCP/UDP from a source port the container does not own */
    PM_DROP_SPOOF_ARP = 4,
    PM_DROP_FENCE = 5,        /* to a protected or link-local network, or to the host itself */
    PM_DROP_NOT_IP = 6,       /* neither IPv4 nor ARP */
    PM_DROP_TUNNEL = 7,       /* from a tunnel, for no local container and not for this gateway */
    PM_DROP_ICMP = 8,         /* ICMP type a container may not send / nobody to deliver to */
    PM_DROP_REFUSED = 9,      /* unmapped port on a public IP: answered with RST / port unreachable */
    PM_DROP_NO_ROUTE = 10,    /* fib lookup found no way out */
    PM_DROP_MAX = 11,
};

/* echo (LRU_HASH pm_echo_key -> pm_dest): a container's ICMP echo requests, so the reply finds it. */
struct pm_echo_key {
    __be32 public_ip;  /* the container's address the request left from */
    __be32 remote;     /* the address it pinged */
    __be16 id;         /* the echo identifier */
    __u16 pad;
};

#endif
