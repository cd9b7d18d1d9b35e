//! Nodes: joining, placement (the control crate's [`Placement`] machine, or
//! a baseline rule), serving, computing steps, dying.

use std::collections::VecDeque;

use nnmesh_control::placement::{self, Placement};
use nnmesh_protocol::{PeerId, Span, message::ErrorKind};

use super::{Answer, Cause, Ev, World, milli};
use crate::{
    engine::Time,
    net::{Link, Place, send},
    rng::mix,
    scenario::{DiscoveryMode, PlacementRule, Replay},
};

/// A node.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) peer: PeerId,
    /// Its DHT key.
    pub(crate) key: u64,
    pub(crate) profile: usize,
    pub(crate) place: Place,
    pub(crate) link: Link,
    pub(crate) joined: Time,
    /// When its process came up (it is a DHT member from then on).
    pub(crate) started_at: Option<Time>,
    pub(crate) alive: bool,
    pub(crate) died: Option<Time>,
    /// Whether its host closed the connections when it died.
    pub(crate) fin: bool,
    /// Blocks it can hold.
    pub(crate) len: u32,
    /// Tokens/s through `len` blocks (what its records announce).
    pub(crate) tp: f32,
    pub(crate) machine: Option<Placement>,
    /// The span it serves (the newest, during a move).
    pub(crate) span: Option<Span>,
    /// Serving generation: a session opened on an older one is gone.
    pub(crate) generation: u32,
    /// The spans counted in the live census (two during a move).
    pub(crate) counted: Vec<Span>,
    pub(crate) loading: Option<Span>,
    queue: VecDeque<u32>,
    batch: Vec<u32>,
    busy: bool,
    svc_gen: u32,
    in_system: u32,
    /// Sessions waiting on it: (session, token).
    pub(crate) watchers: Vec<(u32, u32)>,
    /// Its block records (`blocks` mode), lingering ones included.
    pub(crate) recs: Vec<u32>,
    /// The record of the span it serves now.
    cur_rec: Option<u32>,
    serving_pos: Option<u32>,
    /// Control RPCs initiated or served, and bytes (Info served in
    /// `providers` mode aside, see `info_at_join`).
    pub(crate) rpcs: f64,
    pub(crate) bytes: f64,
    /// Discoveries mesh-wide when it started and when it died.
    pub(crate) info_at_join: u64,
    info_at_death: Option<u64>,
}

impl Node {
    /// `Info` calls mesh-wide up to its death (or `now_calls`).
    pub(crate) fn info_until(&self, now_calls: u64) -> u64 {
        self.info_at_death.unwrap_or(now_calls)
    }

    /// Queue fullness, 0..1 (what its record announces as load).
    pub(crate) fn load(&self, queue: u32) -> f32 {
        self.in_system as f32 / queue.max(1) as f32
    }

    /// Whether it serves `span` now.
    pub(crate) fn serves(&self, span: Span) -> bool {
        self.span
            .is_some_and(|s| s.start <= span.start && span.end <= s.end)
    }
}

/// A step waiting at, or running on, a node.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub(crate) session: u32,
    pub(crate) token: u32,
    pub(crate) node: u32,
    pub(crate) span: Span,
    /// Whether the session was opened on this node (by `generation`).
    pub(crate) opened: Option<u32>,
    /// The step's tokens (all rows).
    pub(crate) tokens: u32,
    /// Whether it is the prefill (step 0).
    pub(crate) prefill: bool,
    /// Rows.
    pub(crate) rows: u32,
    /// History entries to replay first: (first entry, entries).
    pub(crate) replay: (u32, u32),
    /// Prompt tokens per row (entry 0 of the history).
    pub(crate) prompt: u32,
    /// Bytes of the answer.
    pub(crate) reply_bytes: u64,
    /// Its compute time alone, set on arrival.
    service: Time,
    batchable: bool,
}

impl Job {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        session: u32,
        token: u32,
        node: u32,
        span: Span,
        opened: Option<u32>,
        tokens: u32,
        prefill: bool,
        rows: u32,
        replay: (u32, u32),
        prompt: u32,
        reply_bytes: u64,
    ) -> Job {
        Job {
            session,
            token,
            node,
            span,
            opened,
            tokens,
            prefill,
            rows,
            replay,
            prompt,
            reply_bytes,
            service: Time::ZERO,
            batchable: false,
        }
    }
}

impl World {
    /// Adds a node that joins at `at`; returns it.
    pub(super) fn add_node(&mut self, at: Time, initial: bool) -> u32 {
        let i = self.nodes.len() as u32;
        let profiles = &self.sc.nodes.profiles;
        let pi = self
            .rng_churn
            .weighted(profiles.iter().map(|p| p.share.max(0.0)));
        let p = &profiles[pi];
        let blocks = self.sc.model.blocks;
        let len = p
            .blocks
            .unwrap_or((p.memory_gb / self.sc.model.block_gb.max(1e-9)).floor() as u32)
            .clamp(1, blocks);
        let tp = (1000.0 / (f64::from(len) * p.decode_ms_per_block)) as f32;
        let link = Link::new(p.up_mbps, p.down_mbps);
        let place = self.draw_place();
        let peer = self.new_peer();
        let key = mix(peer
            .to_bytes()
            .iter()
            .fold(0u64, |h, &b| h.rotate_left(8) ^ u64::from(b)));
        self.nodes.push(Node {
            peer,
            key,
            profile: pi,
            place,
            link,
            joined: at,
            started_at: None,
            alive: true,
            died: None,
            fin: false,
            len,
            tp,
            machine: None,
            span: None,
            generation: 0,
            counted: Vec::new(),
            loading: None,
            queue: VecDeque::new(),
            batch: Vec::new(),
            busy: false,
            svc_gen: 0,
            in_system: 0,
            watchers: Vec::new(),
            recs: Vec::new(),
            cur_rec: None,
            serving_pos: None,
            rpcs: 0.0,
            bytes: 0.0,
            info_at_join: 0,
            info_at_death: None,
        });
        if !initial {
            self.m.joined += 1;
        }
        if let Some(life) = self.lifetime(initial) {
            self.q.at(at + life, Ev::Depart(i));
        }
        self.q
            .at(at + Time::from_secs(self.sc.nodes.startup_s), Ev::Start(i));
        i
    }

    /// The node's process is up: it joins the DHT and places itself.
    pub(super) fn start_node(&mut self, n: u32) {
        if !self.nodes[n as usize].alive {
            return;
        }
        let now = self.now();
        let node = &mut self.nodes[n as usize];
        node.started_at = Some(now);
        node.info_at_join = self.info_calls;
        // Announce: a provider record, republished (`providers`), or block
        // records once serving (`blocks`).
        match self.sc.discovery.mode {
            DiscoveryMode::Providers => self.announce_provider(n),
            DiscoveryMode::Blocks => self.schedule_refresh(n),
        }
        let pinned = self.sc.nodes.pinned.get(n as usize).copied();
        let rule = match self.sc.control.placement.rule {
            PlacementRule::Pinned if pinned.is_none() => PlacementRule::Window,
            r => r,
        };
        let blocks = self.sc.model.blocks;
        match rule {
            PlacementRule::Window => {
                let node = &self.nodes[n as usize];
                let mut machine = Placement::new(
                    self.placement_cfg.clone(),
                    node.peer,
                    node.tp,
                    blocks,
                    node.len,
                    mix(self.sc.seed ^ u64::from(n)),
                );
                let actions = machine.on_event(self.clock.instant(now), placement::Event::Start);
                self.nodes[n as usize].machine = Some(machine);
                self.apply_placement(n, actions);
            }
            PlacementRule::Random => {
                let len = self.nodes[n as usize].len;
                let start = self.rng_churn.range_u32(0, blocks - len);
                self.load(n, Span::new(start, start + len));
            }
            PlacementRule::Pinned => {
                let [s, e] = pinned.expect("pinned nodes have a span");
                self.load(n, Span::new(s, e));
            }
        }
    }

    /// Starts loading `span`; `PlaceLoaded` when done.
    fn load(&mut self, n: u32, span: Span) {
        let node = &mut self.nodes[n as usize];
        node.loading = Some(span);
        let have = node.span.unwrap_or(Span::new(0, 0));
        let new_blocks = span.range().filter(|&b| !have.contains(b as u32)).count();
        let per = self.sc.nodes.profiles[node.profile].load_s_per_block;
        let at = self.now() + Time::from_secs(per * new_blocks as f64);
        self.q.at(at, Ev::PlaceLoaded(n, span));
    }

    /// Carries out the placement machine's actions.
    pub(super) fn apply_placement(&mut self, n: u32, actions: Vec<placement::Action>) {
        for action in actions {
            match action {
                placement::Action::WakeAt(at) => {
                    let t = self.clock.time(at);
                    if t <= self.end {
                        self.q.at(t, Ev::PlaceWake(n));
                    }
                }
                placement::Action::Discover => {
                    self.m.checks += 1;
                    let all = Span::new(0, self.sc.model.blocks);
                    let latency = self.discover_cost(Some(n), None, all);
                    self.q.at(self.now() + latency, Ev::PlaceRecords(n));
                }
                placement::Action::Load { span } => self.load(n, span),
                placement::Action::Serve { span } => self.serve(n, span),
                placement::Action::Drop { span } => self.drop_span(n, span),
                placement::Action::Unload { .. } => {
                    self.nodes[n as usize].loading = None;
                    self.m.aborted += 1;
                }
            }
        }
    }

    pub(super) fn place_wake(&mut self, n: u32) {
        let now = self.clock.instant(self.now());
        let node = &mut self.nodes[n as usize];
        if !node.alive {
            return;
        }
        let Some(m) = node.machine.as_mut() else {
            return;
        };
        let actions = m.on_event(now, placement::Event::Woke);
        self.apply_placement(n, actions);
    }

    /// A node's discovery is answered: the census of the others, live
    /// (`providers`: every provider answered `Info`) or by the records
    /// (`blocks`: dead nodes' unexpired records included).
    pub(super) fn place_records(&mut self, n: u32) {
        if !self.nodes[n as usize].alive || self.nodes[n as usize].machine.is_none() {
            return;
        }
        let census = match self.sc.discovery.mode {
            DiscoveryMode::Providers => {
                let node = &self.nodes[n as usize];
                let mut holders = self.live.holders.clone();
                let mut tp = self.live.tp_milli.clone();
                for span in &node.counted {
                    for b in span.range() {
                        holders[b] -= 1;
                        tp[b] -= milli(node.tp);
                    }
                }
                placement::Census {
                    holders,
                    throughput: tp.iter().map(|&m| m.max(0) as f32 / 1000.0).collect(),
                }
            }
            DiscoveryMode::Blocks => self.records.census_without(&self.nodes[n as usize].recs),
        };
        let now = self.clock.instant(self.now());
        let m = self.nodes[n as usize]
            .machine
            .as_mut()
            .expect("checked above");
        let actions = m.on_census(now, &census);
        self.apply_placement(n, actions);
    }

    pub(super) fn place_loaded(&mut self, n: u32, span: Span) {
        let now = self.clock.instant(self.now());
        let node = &mut self.nodes[n as usize];
        if !node.alive || node.loading != Some(span) {
            return;
        }
        match node.machine.as_mut() {
            Some(m) => {
                let actions = m.on_event(now, placement::Event::Loaded { span });
                self.apply_placement(n, actions);
            }
            None => self.serve(n, span),
        }
    }

    /// The node serves `span` (just loaded).
    fn serve(&mut self, n: u32, span: Span) {
        let now = self.now();
        let node = &mut self.nodes[n as usize];
        node.loading = None;
        if node.span.is_none() {
            self.m.placed += 1;
        }
        node.span = Some(span);
        node.generation += 1;
        node.counted.push(span);
        let tp = node.tp;
        self.live.add(span, tp);
        if node.serving_pos.is_none() {
            node.serving_pos = Some(self.serving.len() as u32);
            self.serving.push(n);
        }
        if self.sc.discovery.mode == DiscoveryMode::Blocks {
            let load = self.nodes[n as usize].load(self.sc.nodes.queue);
            let expires = now + Time::from_secs(self.sc.discovery.record_ttl_s);
            let id = self.records.insert(n, span, tp, load, expires);
            let node = &mut self.nodes[n as usize];
            node.recs.push(id);
            node.cur_rec = Some(id);
            self.q.at(expires, Ev::Expire(id));
            self.announce_records(n, span);
        }
        self.killer_resumes(n);
    }

    /// The node stops serving `span` (a move's old span). Its queued steps
    /// still run (they are ahead of the stop in the stage's mailbox). In
    /// `blocks` mode it withdraws that span's record (Petals announces a
    /// moved span offline); only a dead node's records linger.
    fn drop_span(&mut self, n: u32, span: Span) {
        let node = &mut self.nodes[n as usize];
        if let Some(i) = node.counted.iter().position(|&s| s == span) {
            node.counted.remove(i);
            let tp = node.tp;
            self.live.remove(span, tp);
        }
        if self.sc.discovery.mode == DiscoveryMode::Blocks {
            let old: Vec<u32> = node
                .recs
                .iter()
                .copied()
                .filter(|&id| {
                    Some(id) != node.cur_rec && self.records.get(id).is_some_and(|r| r.span == span)
                })
                .collect();
            for id in old {
                self.records.remove(id);
                self.nodes[n as usize].recs.retain(|&r| r != id);
                self.announce_records(n, span);
            }
        }
    }

    /// Kills node `n`; `fin` forces how (the killer's SIGKILL closes the
    /// connections), else it is drawn.
    pub(super) fn kill_node(&mut self, n: u32, fin: Option<bool>) {
        if !self.nodes[n as usize].alive {
            return;
        }
        let now = self.now();
        let fin = fin.unwrap_or_else(|| self.rng_churn.chance(self.sc.churn.fin_share));
        self.m.left += 1;
        let info_calls = self.info_calls;
        let node = &mut self.nodes[n as usize];
        node.alive = false;
        node.died = Some(now);
        node.fin = fin;
        node.info_at_death = Some(info_calls);
        let tp = node.tp;
        for span in std::mem::take(&mut node.counted) {
            self.live.remove(span, tp);
        }
        if let Some(pos) = node.serving_pos.take() {
            let last = self.serving.pop().expect("a serving node is listed");
            if (pos as usize) < self.serving.len() {
                self.serving[pos as usize] = last;
                self.nodes[last as usize].serving_pos = Some(pos);
            }
        }
        let node = &mut self.nodes[n as usize];
        let jobs: Vec<u32> = node.queue.drain(..).chain(node.batch.drain(..)).collect();
        node.in_system = 0;
        node.busy = false;
        for j in jobs {
            self.free_job(j);
        }
        // A provider that vanished stays listed until its provider record
        // expires: between one republish period and the record's lifetime.
        if !fin && self.sc.discovery.mode == DiscoveryMode::Providers {
            let d = &self.sc.discovery;
            let stale = self
                .rng_churn
                .range_f64(d.provider_ttl_s - d.provider_republish_s, d.provider_ttl_s);
            self.stale_providers
                .push(std::cmp::Reverse(now + Time::from_secs(stale.max(0.0))));
        }
        let watchers = std::mem::take(&mut self.nodes[n as usize].watchers);
        for (s, token) in watchers {
            self.notify_death(s, token, n);
        }
    }

    /// A step's message reaches its node: refused, or admitted.
    pub(super) fn hop_arrive(&mut self, j: u32) {
        let job = self.jobs[j as usize].clone();
        let n = job.node;
        let node = &self.nodes[n as usize];
        if !node.alive {
            // Its session learns of the death from its detector.
            self.free_job(j);
            return;
        }
        let refusal = if !node.serves(job.span) {
            Some((ErrorKind::NotServed, Cause::Moved))
        } else if job.opened.is_some_and(|g| g != node.generation) {
            Some((ErrorKind::UnknownRequest, Cause::Moved))
        } else if node.in_system >= self.sc.nodes.queue {
            Some((ErrorKind::Overloaded, Cause::Overloaded))
        } else if self.rng_fault.chance(self.sc.churn.hop_failure_p) {
            Some((ErrorKind::UnknownRequest, Cause::Injected))
        } else {
            None
        };
        if let Some((kind, cause)) = refusal {
            let bytes = self.sc.net.msg_overhead_bytes;
            self.answer(j, bytes, Answer::Refused(kind, cause));
            self.free_job(j);
            return;
        }
        let service = self.service_time(&job, n);
        let batchable = !job.prefill && job.replay.1 == 0;
        let node = &mut self.nodes[n as usize];
        let jb = &mut self.jobs[j as usize];
        jb.service = service;
        jb.batchable = batchable;
        node.in_system += 1;
        node.queue.push_back(j);
        if !node.busy {
            self.start_service(n);
        }
    }

    /// The compute time of `job` alone on node `n`.
    fn service_time(&self, job: &Job, n: u32) -> Time {
        let p = &self.sc.nodes.profiles[self.nodes[n as usize].profile];
        let layers = f64::from(job.span.len());
        let overhead = self.sc.nodes.step_overhead_ms;
        let rows = f64::from(job.rows);
        let decode =
            p.decode_ms_per_block * layers * (1.0 + self.sc.nodes.batch_growth * (rows - 1.0));
        let prefill = |tokens: f64| p.prefill_ms_per_token_block * layers * tokens;
        let step = if job.prefill {
            prefill(f64::from(job.tokens))
        } else {
            decode
        };
        let (first, count) = job.replay;
        let replay = if count == 0 {
            0.0
        } else {
            let has_prompt = first == 0;
            let decodes = f64::from(count - u32::from(has_prompt));
            let prompt = if has_prompt {
                rows * f64::from(job.prompt)
            } else {
                0.0
            };
            match self.sc.control.replay {
                // One forward per replayed step (the node before it
                // chunked replays; today a hop that intervenes at every
                // step).
                Replay::Steps => {
                    let mut ms = decodes * (overhead + decode);
                    if has_prompt {
                        ms += overhead + prefill(prompt);
                    }
                    ms
                }
                // The prompt, then the generated tokens as one chunk (the
                // node today, for a hop with no intervention at them).
                Replay::Chunk => {
                    let mut ms = 0.0;
                    if decodes > 0.0 {
                        ms += overhead + prefill(decodes * rows);
                    }
                    if has_prompt {
                        ms += overhead + prefill(prompt);
                    }
                    ms
                }
                // One prefill of everything.
                Replay::Prefill => overhead + prefill(prompt + decodes * rows),
            }
        };
        Time::from_ms(overhead + step + replay)
    }

    /// Starts the next forward: the queue's head, with the decode steps
    /// behind it when it is one (up to `max_batch`).
    fn start_service(&mut self, n: u32) {
        let max_batch = self.sc.nodes.max_batch as usize;
        let growth = self.sc.nodes.batch_growth;
        let node = &mut self.nodes[n as usize];
        let Some(head) = node.queue.pop_front() else {
            node.busy = false;
            return;
        };
        node.batch.clear();
        node.batch.push(head);
        let mut service = self.jobs[head as usize].service;
        if self.jobs[head as usize].batchable {
            let mut i = 0;
            while node.batch.len() < max_batch && i < node.queue.len() {
                let j = node.queue[i];
                if self.jobs[j as usize].batchable {
                    node.queue.remove(i);
                    node.batch.push(j);
                    service = service.max(self.jobs[j as usize].service);
                } else {
                    i += 1;
                }
            }
            let extra = (node.batch.len() - 1) as f64 * growth;
            service = Time::from_secs(service.secs() * (1.0 + extra));
        }
        node.busy = true;
        node.svc_gen += 1;
        let g = node.svc_gen;
        self.q.at(self.now() + service, Ev::Computed(n, g));
    }

    /// A forward ends: its steps answer, the next one starts.
    pub(super) fn computed(&mut self, n: u32, g: u32) {
        let node = &mut self.nodes[n as usize];
        if !node.alive || node.svc_gen != g || !node.busy {
            return;
        }
        let batch = std::mem::take(&mut node.batch);
        node.in_system -= batch.len() as u32;
        let generation = node.generation;
        for &j in &batch {
            let bytes = self.jobs[j as usize].reply_bytes;
            self.answer(j, bytes, Answer::Output(generation));
            self.free_job(j);
        }
        self.nodes[n as usize].batch = batch;
        self.nodes[n as usize].batch.clear();
        self.start_service(n);
    }

    /// Sends job `j`'s answer back to its session.
    fn answer(&mut self, j: u32, bytes: u64, answer: Answer) {
        let job = &self.jobs[j as usize];
        let (s, token, n) = (job.session, job.token, job.node);
        let now = self.now();
        let one_way = self.one_way(
            &self.nodes[n as usize].place,
            &self.sessions[s as usize].place,
        );
        let (node, sess) = (&mut self.nodes[n as usize], &mut self.sessions[s as usize]);
        let at = send(&mut node.link, &mut sess.link, bytes, now, one_way);
        self.q.at(at, Ev::Reply(s, token, answer));
    }

    pub(super) fn new_job(&mut self, job: Job) -> u32 {
        match self.free_jobs.pop() {
            Some(j) => {
                self.jobs[j as usize] = job;
                j
            }
            None => {
                self.jobs.push(job);
                (self.jobs.len() - 1) as u32
            }
        }
    }

    fn free_job(&mut self, j: u32) {
        self.free_jobs.push(j);
    }

    /// Refreshes the node's records (`blocks`) or its provider record
    /// (`providers`).
    pub(super) fn refresh(&mut self, n: u32) {
        if !self.nodes[n as usize].alive {
            return;
        }
        match self.sc.discovery.mode {
            DiscoveryMode::Providers => self.announce_provider(n),
            DiscoveryMode::Blocks => {
                let now = self.now();
                let node = &self.nodes[n as usize];
                if let Some(span) = node.span {
                    let load = node.load(self.sc.nodes.queue);
                    let expires = now + Time::from_secs(self.sc.discovery.record_ttl_s);
                    let id = match node.cur_rec.filter(|&id| self.records.get(id).is_some()) {
                        Some(id) => {
                            self.records.refresh(id, load, expires);
                            id
                        }
                        None => {
                            let id = self.records.insert(n, span, node.tp, load, expires);
                            let node = &mut self.nodes[n as usize];
                            node.recs.push(id);
                            node.cur_rec = Some(id);
                            id
                        }
                    };
                    self.q.at(expires, Ev::Expire(id));
                    self.announce_records(n, span);
                }
                self.schedule_refresh(n);
            }
        }
    }

    fn schedule_refresh(&mut self, n: u32) {
        let every = match self.sc.discovery.mode {
            DiscoveryMode::Providers => self.sc.discovery.provider_republish_s,
            DiscoveryMode::Blocks => self.sc.discovery.record_refresh_s,
        };
        let jitter = 0.9 + 0.2 * self.rng_misc.f64();
        self.q
            .at(self.now() + Time::from_secs(every * jitter), Ev::Refresh(n));
    }

    /// A record may have expired.
    pub(super) fn expire(&mut self, id: u32) {
        let now = self.now();
        let Some(rec) = self.records.get(id) else {
            return;
        };
        if rec.expires > now {
            return;
        }
        let n = rec.node;
        self.records.remove(id);
        let node = &mut self.nodes[n as usize];
        node.recs.retain(|&r| r != id);
        if node.cur_rec == Some(id) {
            node.cur_rec = None;
        }
    }

    /// Provider announcement (`providers`): a lookup and a store on the
    /// key's storers, then again every republish period.
    fn announce_provider(&mut self, n: u32) {
        let b = self.sc.model.blocks as usize;
        self.lookup_cost(Some(n), 1.0, "announce");
        let k = f64::from(self.sc.discovery.k);
        self.charge(n, k, k * 100.0, "announce");
        self.key_ops[b].0 += 1.0;
        self.schedule_refresh(n);
    }

    /// Block records stored (`blocks`): a lookup and a store per block.
    fn announce_records(&mut self, n: u32, span: Span) {
        let blocks = f64::from(span.len());
        self.lookup_cost(Some(n), blocks, "announce");
        let k = f64::from(self.sc.discovery.k);
        let bytes = k * blocks * self.record_bytes as f64;
        self.charge(n, k * blocks, bytes, "announce");
        for b in span.range() {
            self.key_ops[b].0 += 1.0;
        }
    }
}
