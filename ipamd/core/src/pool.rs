//! The warm-pool policy (compat.md section 3) as a pure function: from the pool's
//! numbers, the instance's limits and the knobs, what to allocate or free next.
//! No I/O, no clock: the caller passes what it observed.

/// The instance type's limits (DescribeInstanceTypes NetworkInfo).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_enis: u32,
    /// IPv4 addresses per ENI, the ENI's own primary included.
    pub ipv4_per_eni: u32,
}

impl Limits {
    /// Usable slots per ENI: the primary address is not given to pods.
    pub fn slots_per_eni(&self) -> u32 {
        self.ipv4_per_eni.saturating_sub(1)
    }

    /// max-pods = ENIs × (IPs per ENI − 1) + 2.
    pub fn max_pods(&self) -> u32 {
        self.max_enis * self.slots_per_eni() + 2
    }
}

/// The limits of a known instance type without asking EC2 (upstream keeps such a table
/// too); `None`: ask DescribeInstanceTypes.
pub fn known_limits(instance_type: &str) -> Option<Limits> {
    let t = crate::instance_limits::TABLE;
    let i = t
        .binary_search_by(|(name, _, _)| (*name).cmp(instance_type))
        .ok()?;
    Some(Limits {
        max_enis: t[i].1.max(1) as u32,
        ipv4_per_eni: t[i].2.max(1) as u32,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// WARM_ENI_TARGET: keep whole ENIs' worth of addresses spare.
    Eni { warm_eni: u32 },
    /// WARM_IP_TARGET / MINIMUM_IP_TARGET.
    IpTarget { warm_ip: u32, min_ip: u32 },
    /// ENABLE_PREFIX_DELEGATION: /28s; with no IP targets, WARM_PREFIX_TARGET.
    Prefix {
        warm_prefix: u32,
        warm_ip: u32,
        min_ip: u32,
    },
}

/// What the pool holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolState {
    pub enis: u32,
    /// Addresses held for pods (secondary IPs, or every address of the /28s).
    pub total: u32,
    pub assigned: u32,
    /// Released recently: not assignable yet but still counted in `total`.
    pub cooldown: u32,
    /// Secondary-IP or prefix slots still free on attached ENIs.
    pub free_slots: u32,
    /// Prefixes held (prefix mode).
    pub prefixes: u32,
}

impl PoolState {
    pub fn available(&self) -> u32 {
        self.total.saturating_sub(self.assigned)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    pub limits: Limits,
    /// MAX_ENI, or the instance limit.
    pub max_enis: u32,
    /// Custom networking: the primary ENI gives no address to pods.
    pub primary_serves: bool,
    /// The node's own pod capacity (kubelet's `status.capacity.pods`), when known.
    pub max_pods_cap: Option<u32>,
}

/// The next step for the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Steady,
    /// Add this many secondary IPs (or /28 prefixes) to ENIs that have room.
    Assign {
        count: u32,
    },
    /// Attach a new ENI (there is no room left on the attached ones).
    AttachEni,
    /// Release this many spare addresses (or prefixes) back to EC2.
    Release {
        count: u32,
    },
    /// Free one whole ENI that holds no assigned address.
    FreeEni,
    /// Short of addresses but no way to get more: every ENI full and at the ENI cap, or max-pods reached.
    AtCapacity,
}

impl Policy {
    /// Addresses this node may hold for pods: upstream's max-pods (with custom networking
    /// the primary ENI's addresses are not counted), capped by kubelet's own max-pods.
    pub fn max_pods(&self) -> u32 {
        let enis = if self.primary_serves {
            self.limits.max_enis
        } else {
            self.limits.max_enis.saturating_sub(1)
        };
        let formula = enis * self.limits.slots_per_eni() + 2;
        self.max_pods_cap.map_or(formula, |c| formula.min(c))
    }

    /// Addresses per allocation unit: 1 for IPs, 16 for a /28.
    fn unit(&self) -> u32 {
        match self.mode {
            Mode::Prefix { .. } => 16,
            _ => 1,
        }
    }

    /// How many addresses short the pool is (0 when none).
    pub fn shortfall(&self, s: &PoolState) -> u32 {
        self.shortfall_with_waiting(s, 0)
    }

    /// The shortfall once `waiting` pods (not in the datastore yet) hold addresses too:
    /// what to ask for in one call when pods wait. Each waiting pod adds to the warm
    /// part; a MINIMUM_IP_TARGET the pool is below already counts them.
    pub fn shortfall_with_waiting(&self, s: &PoolState, waiting: u32) -> u32 {
        let avail = s.available();
        match self.mode {
            Mode::IpTarget { warm_ip, min_ip }
            | Mode::Prefix {
                warm_ip, min_ip, ..
            } if warm_ip > 0 || min_ip > 0 => {
                let a = (warm_ip + waiting).saturating_sub(avail);
                let b = min_ip.saturating_sub(s.total);
                a.max(b)
            }
            Mode::Eni { warm_eni } => {
                let want = self.limits.slots_per_eni() * warm_eni + waiting;
                if (warm_eni == 0 && avail == 0) || avail < want {
                    // Grow by what makes `available` reach the target (at least one address).
                    want.saturating_sub(avail).max(1)
                } else {
                    0
                }
            }
            Mode::Prefix { warm_prefix, .. } => {
                // An empty pool keeps one prefix even with no pod waiting.
                let floor = if avail == 0 && waiting == 0 { 1 } else { 0 };
                (16 * warm_prefix.max(floor) + waiting).saturating_sub(avail)
            }
            Mode::IpTarget { .. } => waiting.saturating_sub(avail),
        }
    }

    /// Spare addresses beyond the targets that may go back (IP-target modes only;
    /// ENI mode frees whole ENIs and never single addresses).
    pub fn surplus(&self, s: &PoolState) -> u32 {
        let avail = s.available().saturating_sub(s.cooldown);
        match self.mode {
            Mode::IpTarget { warm_ip, min_ip }
            | Mode::Prefix {
                warm_ip, min_ip, ..
            } if warm_ip > 0 || min_ip > 0 => {
                let over_warm = avail.saturating_sub(warm_ip);
                let over_min = s.total.saturating_sub(min_ip);
                over_warm.min(over_min)
            }
            Mode::Prefix { warm_prefix, .. } => avail.saturating_sub(16 * warm_prefix.max(1)),
            _ => 0,
        }
    }

    pub fn decide(&self, s: &PoolState) -> Decision {
        let max_pods = self.max_pods();
        let short = self.shortfall(s);
        if short > 0 {
            // Never hold more than max-pods addresses for pods.
            let room_pods = max_pods.saturating_sub(s.total);
            let units = short.div_ceil(self.unit());
            let units = match self.mode {
                Mode::Prefix { .. } => units,
                _ => units.min(room_pods),
            };
            if units == 0 {
                return Decision::AtCapacity;
            }
            if s.free_slots > 0 {
                // ENI mode fills whole ENIs, as upstream: its shrink rule frees whole ENIs.
                let count = match self.mode {
                    Mode::Eni { .. } => s.free_slots.min(room_pods),
                    _ => units.min(s.free_slots),
                };
                return Decision::Assign { count };
            }
            if s.enis < self.max_enis {
                return Decision::AttachEni;
            }
            return Decision::AtCapacity;
        }
        let surplus = self.surplus(s);
        let unit = self.unit();
        if surplus >= unit {
            return Decision::Release {
                count: surplus / unit,
            };
        }
        if let Mode::Eni { warm_eni } = self.mode {
            let per = self.limits.slots_per_eni();
            // Free a whole ENI when a whole spare ENI's worth is beyond the target.
            if s.enis > 1 && s.available().saturating_sub(s.cooldown) >= (warm_eni + 1) * per {
                return Decision::FreeEni;
            }
        }
        Decision::Steady
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_table_knows_the_common_types_and_nothing_else() {
        let l = |t| known_limits(t).map(|l| (l.max_enis, l.ipv4_per_eni));
        assert_eq!(l("m5.large"), Some((3, 10)));
        assert_eq!(l("t3.small"), Some((3, 4)));
        assert_eq!(l("c5.18xlarge"), Some((15, 50)));
        assert_eq!(l("m5.4xlarge"), Some((8, 30)));
        assert_eq!(l("x9.imaginary"), None);
        assert_eq!(l(""), None);
        assert!(
            crate::instance_limits::TABLE
                .windows(2)
                .all(|w| w[0].0 < w[1].0),
            "sorted, each type once"
        );
    }

    const T3_SMALL: Limits = Limits {
        max_enis: 3,
        ipv4_per_eni: 4,
    };
    const T3_MEDIUM: Limits = Limits {
        max_enis: 3,
        ipv4_per_eni: 6,
    };
    const M5_LARGE: Limits = Limits {
        max_enis: 3,
        ipv4_per_eni: 10,
    };
    const C5_18XL: Limits = Limits {
        max_enis: 15,
        ipv4_per_eni: 50,
    };

    #[test]
    fn max_pods_as_upstream() {
        assert_eq!(T3_MEDIUM.max_pods(), 17);
        assert_eq!(M5_LARGE.max_pods(), 29);
        assert_eq!(C5_18XL.max_pods(), 737);
        assert_eq!(T3_SMALL.slots_per_eni(), 3);
    }

    /// Simulates the control loop against an ideal EC2 until the policy is steady,
    /// returning (ENIs, addresses). The primary ENI exists from the start.
    fn converge(p: Policy, assigned: u32) -> (u32, u32) {
        let per = p.limits.slots_per_eni();
        let unit = match p.mode {
            Mode::Prefix { .. } => 16,
            _ => 1,
        };
        let mut s = PoolState {
            enis: 1,
            total: 0,
            assigned: 0,
            cooldown: 0,
            free_slots: per,
            prefixes: 0,
        };
        for _ in 0..1000 {
            s.assigned = assigned.min(s.total);
            match p.decide(&s) {
                Decision::Steady | Decision::AtCapacity => return (s.enis, s.total),
                Decision::Assign { count } => {
                    s.total += count * unit;
                    s.free_slots -= count;
                    s.prefixes += if unit == 16 { count } else { 0 };
                }
                Decision::AttachEni => {
                    s.enis += 1;
                    s.free_slots += per;
                }
                Decision::Release { count } => {
                    s.total -= count * unit;
                    s.free_slots += count;
                }
                Decision::FreeEni => {
                    s.enis -= 1;
                    s.total -= per;
                }
            }
        }
        panic!("did not converge: {s:?}");
    }

    fn policy(limits: Limits, mode: Mode, max_eni: Option<u32>) -> Policy {
        Policy {
            mode,
            limits,
            max_enis: max_eni.unwrap_or(limits.max_enis).min(limits.max_enis),
            primary_serves: true,
            max_pods_cap: None,
        }
    }

    #[test]
    fn max_pods_without_the_primary_eni_and_under_kubelets_cap() {
        let mut p = policy(M5_LARGE, Mode::Eni { warm_eni: 1 }, None);
        assert_eq!(p.max_pods(), 29);
        // Custom networking, upstream's formula: (3 - 1) * (10 - 1) + 2.
        p.primary_serves = false;
        assert_eq!(p.max_pods(), 20);
        // kubelet's --max-pods lower still: the pool holds no more than that.
        p.max_pods_cap = Some(11);
        assert_eq!(p.max_pods(), 11);
        let full = PoolState {
            enis: 2,
            total: 11,
            assigned: 11,
            free_slots: 7,
            ..Default::default()
        };
        assert_eq!(p.decide(&full), Decision::AtCapacity);
        p.max_pods_cap = Some(500);
        assert_eq!(p.max_pods(), 20, "a cap above the formula changes nothing");
    }

    #[test]
    fn upstream_scenarios() {
        struct Case {
            name: &'static str,
            limits: Limits,
            mode: Mode,
            max_eni: Option<u32>,
            pods: u32,
            enis: u32,
            ips: u32,
        }
        let cases = [
            Case {
                name: "t3.small WARM_IP=2 MIN_IP=5, 0 pods -> 2 ENIs, 5 IPs",
                limits: T3_SMALL,
                mode: Mode::IpTarget {
                    warm_ip: 2,
                    min_ip: 5,
                },
                max_eni: None,
                pods: 0,
                enis: 2,
                ips: 5,
            },
            Case {
                name: "WARM_ENI=3 with MAX_ENI=2 -> 2 ENIs",
                limits: M5_LARGE,
                mode: Mode::Eni { warm_eni: 3 },
                max_eni: Some(2),
                pods: 0,
                enis: 2,
                ips: 18,
            },
            Case {
                name: "IP target (WARM 6, MIN 10) -> 10 IPs",
                limits: M5_LARGE,
                mode: Mode::IpTarget {
                    warm_ip: 6,
                    min_ip: 10,
                },
                max_eni: None,
                pods: 0,
                enis: 2,
                ips: 10,
            },
            Case {
                name: "default WARM_ENI=1, 0 pods: one ENI's worth spare",
                limits: M5_LARGE,
                mode: Mode::Eni { warm_eni: 1 },
                max_eni: None,
                pods: 0,
                enis: 1,
                ips: 9,
            },
            Case {
                name: "WARM_ENI=1 with 5 pods: a second ENI, filled whole",
                limits: M5_LARGE,
                mode: Mode::Eni { warm_eni: 1 },
                max_eni: None,
                pods: 5,
                enis: 2,
                ips: 18,
            },
            Case {
                name: "IP target with 8 pods: WARM_IP above the assigned",
                limits: M5_LARGE,
                mode: Mode::IpTarget {
                    warm_ip: 3,
                    min_ip: 0,
                },
                max_eni: None,
                pods: 8,
                enis: 2,
                ips: 11,
            },
            Case {
                name: "never past max-pods (t3.small, 11 = 3x3+2)",
                limits: T3_SMALL,
                mode: Mode::IpTarget {
                    warm_ip: 50,
                    min_ip: 0,
                },
                max_eni: None,
                pods: 0,
                enis: 3,
                ips: 9,
            },
            Case {
                name: "prefix mode, WARM_PREFIX=1: one /28",
                limits: M5_LARGE,
                mode: Mode::Prefix {
                    warm_prefix: 1,
                    warm_ip: 0,
                    min_ip: 0,
                },
                max_eni: None,
                pods: 0,
                enis: 1,
                ips: 16,
            },
            Case {
                name: "prefix mode, 20 pods, WARM_PREFIX=1: 3 /28s",
                limits: M5_LARGE,
                mode: Mode::Prefix {
                    warm_prefix: 1,
                    warm_ip: 0,
                    min_ip: 0,
                },
                max_eni: None,
                pods: 20,
                enis: 1,
                ips: 48,
            },
            Case {
                name: "prefix mode with WARM_IP=5 MIN_IP=20: rounded up to /28s",
                limits: M5_LARGE,
                mode: Mode::Prefix {
                    warm_prefix: 0,
                    warm_ip: 5,
                    min_ip: 20,
                },
                max_eni: None,
                pods: 0,
                enis: 1,
                ips: 32,
            },
        ];
        for c in cases {
            let got = converge(policy(c.limits, c.mode, c.max_eni), c.pods);
            assert_eq!(got, (c.enis, c.ips), "{}", c.name);
        }
    }

    #[test]
    fn waiting_pods_add_to_the_warm_part_not_to_a_minimum_that_counts_them() {
        let st = |total, assigned| PoolState {
            enis: 1,
            total,
            assigned,
            cooldown: 0,
            free_slots: 9 - total,
            prefixes: 0,
        };
        let warm_min = policy(
            M5_LARGE,
            Mode::IpTarget {
                warm_ip: 3,
                min_ip: 5,
            },
            None,
        );
        // (state, waiting, want): found by ops.rs, a fresh node asked 6 for MIN 5 and a
        // pod, then gave one back.
        for (s, w, want) in [
            (st(0, 0), 0, 5),
            (st(0, 0), 1, 5),
            (st(0, 0), 2, 5),
            (st(0, 0), 3, 6),
            (st(5, 5), 4, 7),
            (st(6, 3), 0, 0),
            (st(6, 6), 1, 4),
        ] {
            assert_eq!(
                warm_min.shortfall_with_waiting(&s, w),
                want,
                "{s:?} waiting {w}"
            );
        }
        let warm_only = policy(
            M5_LARGE,
            Mode::IpTarget {
                warm_ip: 2,
                min_ip: 0,
            },
            None,
        );
        assert_eq!(warm_only.shortfall_with_waiting(&st(4, 4), 3), 5);
        let eni = policy(M5_LARGE, Mode::Eni { warm_eni: 1 }, None);
        assert_eq!(eni.shortfall_with_waiting(&st(9, 9), 2), 11);
        assert_eq!(
            eni.shortfall_with_waiting(&st(9, 9), 0),
            eni.shortfall(&st(9, 9))
        );
    }

    #[test]
    fn decisions_table() {
        let p = policy(
            M5_LARGE,
            Mode::IpTarget {
                warm_ip: 2,
                min_ip: 0,
            },
            None,
        );
        let s = |total, assigned, cooldown, free_slots, enis| PoolState {
            enis,
            total,
            assigned,
            cooldown,
            free_slots,
            prefixes: 0,
        };
        // Short by 2 with room: assign 2 in one batch.
        assert_eq!(p.decide(&s(0, 0, 0, 9, 1)), Decision::Assign { count: 2 });
        // Short, no room on attached ENIs: attach.
        assert_eq!(p.decide(&s(9, 9, 0, 0, 1)), Decision::AttachEni);
        // Short, no room, at the ENI cap: capacity.
        assert_eq!(p.decide(&s(27, 27, 0, 0, 3)), Decision::AtCapacity);
        // 5 spare with WARM_IP=2: release 3.
        assert_eq!(p.decide(&s(7, 2, 0, 2, 1)), Decision::Release { count: 3 });
        // Spare in cooldown is not released.
        assert_eq!(p.decide(&s(7, 2, 3, 2, 1)), Decision::Steady);
        // ENI mode frees a whole ENI only past (WARM_ENI+1) x per-ENI spare, never single IPs.
        let e = policy(M5_LARGE, Mode::Eni { warm_eni: 1 }, None);
        assert_eq!(e.decide(&s(18, 0, 0, 0, 2)), Decision::FreeEni);
        assert_eq!(e.decide(&s(18, 1, 0, 0, 2)), Decision::Steady);
        assert_eq!(
            e.decide(&s(9, 0, 0, 0, 1)),
            Decision::Steady,
            "the primary ENI stays"
        );
        // WARM_ENI=0: grow only when nothing is available.
        let z = policy(M5_LARGE, Mode::Eni { warm_eni: 0 }, None);
        assert_eq!(z.decide(&s(3, 3, 0, 6, 1)), Decision::Assign { count: 6 });
        assert_eq!(z.decide(&s(3, 2, 0, 6, 1)), Decision::Steady);
    }
}
