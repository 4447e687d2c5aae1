// signal_srv demo client: a 1:1 video call over the signal_srv REST + WebSocket API.
//
// Pieces, top to bottom:
//   api()          REST calls; failures become ApiError(status, code, message)
//   accessToken    the application's token for a server with auth=jwt (from the URL fragment)
//   credentials    per-call credentials in sessionStorage, so a reload rejoins the same call
//   Signaling      the WebSocket, reconnecting with backoff under the same credentials
//   Peer           RTCPeerConnection + "perfect negotiation" driven by the server's `polite`
//   Demo           the page: buttons, status, videos, and the `window.demo` test hook
//
// Relay payloads are what the browser emits (RTCSessionDescriptionInit, RTCIceCandidateInit)
// plus two tags: `session`, a random id of the sender's current RTCPeerConnection, and
// `target`, the receiver's session the sender is talking to (null before it knows one).
// They let a peer notice that the other side reloaded (a new RTCPeerConnection that an
// ICE restart of the old one cannot reach) and start over, and drop messages meant for a
// connection that no longer exists.

const API = '/apiv2';
const STORAGE_PREFIX = 'signal_srv.call.';
const ACCESS_TOKEN_KEY = 'signal_srv.access_token';
const BACKOFF_FIRST_MS = 500;
const BACKOFF_MAX_MS = 10000;
const RESTART_JITTER_MS = 500; // after the server says it restarts: reconnect at once, spread over this
const UNACKED_LIMIT = 1000; // numbered frames kept until the server confirms them
const RECONNECT_ATTEMPTS = 12;
const PING_INTERVAL_MS = 15000;
const PONG_TIMEOUT_MS = 10000;
const ICE_STALL_MS = 5000;
const ICE_STALL_RESTARTS = 3;

// Close codes after which reconnecting with the same credentials cannot help.
const FINAL_CLOSE = new Map([
  [1000, 'closed'],
  [1008, 'policy'],
  [4400, 'bad_request'],
  [4401, 'unauthorized'],
  [4404, 'call_not_found'],
  [4409, 'replaced'],
]);

// ---------------------------------------------------------------------------------- REST

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, { token } = {}) {
  const headers = { Accept: 'application/json' };
  if (token) headers.Authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(`${API}${path}`, { method, headers, cache: 'no-store' });
  } catch (err) {
    throw new ApiError(0, 'network_error', `The server cannot be reached (${err.message}).`);
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = body.error ?? {};
    throw new ApiError(response.status, error.code ?? `http_${response.status}`,
      error.message ?? response.statusText);
  }
  return body;
}

// ------------------------------------------------------------------------ accessToken

// With auth=jwt the server creates and joins calls only for the application's users. The
// application's backend mints a token for the signed-in user and opens this page with it in
// the fragment: /#token=<JWT> to start a call, /?call=<id>#token=<JWT> to join one. A
// fragment never reaches a server or its access log. The page keeps the token for this tab
// only (sessionStorage), removes it from the address bar, and sends it when it creates or
// joins a call; the socket and hang-up use the participant's own peer_token, as always.
const accessToken = {
  take() {
    const fragment = new URLSearchParams(location.hash.slice(1));
    const token = fragment.get('token');
    if (token) {
      sessionStorage.setItem(ACCESS_TOKEN_KEY, token);
      fragment.delete('token');
      const rest = fragment.toString();
      history.replaceState(null, '', location.pathname + location.search + (rest ? `#${rest}` : ''));
    }
    return this.get();
  },
  get() {
    return sessionStorage.getItem(ACCESS_TOKEN_KEY);
  },
};

// ------------------------------------------------------------------------ credentials

const credentials = {
  load(callId) {
    try {
      const value = JSON.parse(sessionStorage.getItem(STORAGE_PREFIX + callId));
      return value && value.peer_id && value.peer_token ? value : null;
    } catch {
      return null;
    }
  },
  save(joined) {
    const { call_id, peer_id, peer_token, role, polite } = joined;
    sessionStorage.setItem(STORAGE_PREFIX + call_id,
      JSON.stringify({ call_id, peer_id, peer_token, role, polite }));
  },
  clear(callId) {
    sessionStorage.removeItem(STORAGE_PREFIX + callId);
  },
};

// -------------------------------------------------------------------------- Signaling

// One call's WebSocket. Reconnects with exponential backoff and jitter after any close
// that is not final (FINAL_CLOSE), asking with `last_seq` for every frame it missed
// (the server's lossless resume), and detects a dead socket with application pings.
// Every frame it sends is numbered (`cseq`) and kept until a connect's `last_cseq` says
// the server has it; on each connect it resends, first, what the server did not accept
// (sent into a dying socket, or while there was none). When the server restarts
// (`server_shutdown` with `reconnect`, close 1012) it reconnects at once, with jitter.
class Signaling {
  constructor({ callId, peerId, token, onMessage, onStatus }) {
    this.url = new URL(`${API}/ws`, location.href);
    this.url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
    this.query = { call_id: callId, peer_id: peerId, token };
    this.peerId = peerId;
    this.lastSeq = null;       // `seq` of the last frame received, for a lossless resume
    this.cseq = 0;             // the last `cseq` used
    this.unacked = [];         // [cseq, frame] the server has not confirmed yet
    this.ready = false;        // this socket's own state arrived: numbered frames go out
    this.restarting = false;   // the server said it restarts: reconnect at once
    this.onMessage = onMessage;
    this.onStatus = onStatus;
    this.ws = null;
    this.attempt = 0;
    this.stopped = false;
    this.retryTimer = null;
    this.pingTimer = null;
    this.pongTimer = null;
    this.status = 'connecting';
  }

  start() {
    this.stopped = false;
    this.#open();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    this.#stopPings();
    if (this.ws) {
      this.#detach(this.ws);
      this.ws.close(1000, 'bye');
      this.ws = null;
    }
    this.unacked = [];
    this.#setStatus('closed');
  }

  send(type, payload) {
    this.cseq += 1;
    const frame = JSON.stringify({ type, payload, cseq: this.cseq });
    this.unacked.push([this.cseq, frame]);
    if (this.unacked.length > UNACKED_LIMIT) this.unacked.shift();
    if (this.ready && this.ws?.readyState === WebSocket.OPEN) this.ws.send(frame);
  }

  // The state of this socket's own connect: drop what the server has, resend the rest.
  #acknowledge(lastCseq) {
    const accepted = Number.isInteger(lastCseq) ? lastCseq : 0;
    this.unacked = this.unacked.filter(([cseq]) => cseq > accepted);
    this.cseq = Math.max(this.cseq, accepted);
    for (const [, frame] of this.unacked) this.ws.send(frame);
    this.ready = true;
  }

  #open() {
    this.#setStatus(this.attempt ? 'reconnecting' : 'connecting', { lastSeq: this.lastSeq });
    const query = new URLSearchParams(this.query);
    if (this.lastSeq !== null) query.set('last_seq', String(this.lastSeq));
    this.url.search = query;
    this.ready = false;
    const ws = this.ws = new WebSocket(this.url);
    ws.onopen = () => {
      this.#setStatus('open');
      this.#startPings();
    };
    ws.onmessage = (event) => {
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      this.attempt = 0; // reset only once the server really talks, not on a bare open
      if (Number.isInteger(message.seq)) this.lastSeq = message.seq;
      if (message.type === 'pong') {
        clearTimeout(this.pongTimer);
        return;
      }
      if (message.type === 'state' && message.subject === this.peerId && 'last_cseq' in message) {
        this.#acknowledge(message.last_cseq);
      }
      if (message.type === 'server_shutdown' && message.reconnect) this.restarting = true;
      this.onMessage(message);
    };
    ws.onclose = (event) => this.#closed(ws, event.code, event.reason);
  }

  #closed(ws, code, reason) {
    if (ws !== this.ws) return;
    this.#detach(ws);
    this.ws = null;
    this.#stopPings();
    if (this.stopped) return;
    const final = FINAL_CLOSE.get(code);
    if (final || this.attempt >= RECONNECT_ATTEMPTS) {
      this.stopped = true;
      this.#setStatus('closed', { code, reason: final ?? 'gave_up' });
      return;
    }
    if (this.restarting || code === 1012) {
      // The server restarts and the call goes on elsewhere: at once, spread over a moment.
      this.restarting = false;
      this.attempt += 1;
      this.#setStatus('reconnecting', { code, delay: 0, lastSeq: this.lastSeq });
      this.retryTimer = setTimeout(() => this.#open(), Math.random() * RESTART_JITTER_MS);
      return;
    }
    const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** this.attempt);
    this.attempt += 1;
    this.#setStatus('reconnecting', { code, delay });
    this.retryTimer = setTimeout(() => this.#open(), delay * (0.75 + Math.random() / 2));
  }

  // A socket whose peer vanished may never fire `close`; a missing pong is the sign.
  #startPings() {
    this.pingTimer = setInterval(() => {
      if (this.ws?.readyState !== WebSocket.OPEN) return;
      this.ws.send(JSON.stringify({ type: 'ping' }));
      clearTimeout(this.pongTimer);
      const ws = this.ws;
      this.pongTimer = setTimeout(() => {
        ws.close(4000, 'pong timeout');
        this.#closed(ws, 4000, 'pong timeout');
      }, PONG_TIMEOUT_MS);
    }, PING_INTERVAL_MS);
  }

  #stopPings() {
    clearInterval(this.pingTimer);
    clearTimeout(this.pongTimer);
  }

  #detach(ws) {
    ws.onopen = ws.onmessage = ws.onclose = null;
  }

  #setStatus(status, detail = {}) {
    this.status = status;
    this.onStatus(status, detail);
  }
}

// ------------------------------------------------------------------------------- Peer

// crypto.randomUUID() exists only in secure contexts; this works everywhere.
function randomId() {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

// The media connection to the other participant, with the W3C "perfect negotiation"
// pattern: both sides may offer at any time; on a collision the impolite side (host)
// ignores the incoming offer and the polite side (guest) rolls back and answers.
class Peer {
  constructor({ iceServers, polite, localStream, send, onTrack, onChange, log }) {
    this.iceServers = iceServers;
    this.polite = polite;
    this.localStream = localStream;
    this.sendRaw = send;
    this.onTrack = onTrack;
    this.onChange = onChange;
    this.log = log;
    this.peerPresent = false;
    this.stallRestarts = 0;
    this.chain = Promise.resolve();
    this.pc = null;
    this.#create();
  }

  close() {
    clearTimeout(this.iceTimer);
    this.pc.close();
    this.onChange();
  }

  // The other participant joined (true) or left (false) the call.
  setPeerPresent(present) {
    if (present === this.peerPresent) return;
    this.peerPresent = present;
    if (present) {
      if (this.wantOffer || !this.pc.remoteDescription) this.negotiate();
    } else {
      this.reset();
    }
  }

  // Start over with a fresh RTCPeerConnection (the other side left or reloaded).
  reset() {
    this.pc.close();
    this.#create();
    this.onChange();
  }

  // Our signaling socket came back: recover whatever the outage may have broken.
  resync({ framesLost = false } = {}) {
    const pc = this.pc;
    if (!this.peerPresent) return;
    if (pc.connectionState === 'failed' || pc.iceConnectionState === 'failed') {
      this.log('media connection failed: restarting ICE');
      pc.restartIce();
    } else if (framesLost && pc.remoteDescription) {
      this.log('signaling frames were lost: restarting ICE');
      pc.restartIce();
    } else if (pc.signalingState === 'have-local-offer' && pc.localDescription) {
      this.#send('offer', pc.localDescription.toJSON());
    } else if (pc.signalingState === 'stable' && !pc.remoteDescription) {
      this.negotiate();
    }
  }

  // The other participant's socket came back after a drop.
  peerReconnected() {
    const state = this.pc.connectionState;
    if (state === 'failed' || state === 'disconnected') this.pc.restartIce();
  }

  async negotiate() {
    const pc = this.pc;
    if (!this.peerPresent) {
      this.wantOffer = true;
      return;
    }
    if (pc.signalingState !== 'stable' || this.makingOffer) return;
    if (pc.getTransceivers().length === 0) return; // receive-only: the other side offers
    this.wantOffer = false;
    this.makingOffer = true;
    this.offering = this.#offer(pc);
    await this.offering;
  }

  async #offer(pc) {
    try {
      await pc.setLocalDescription();
      if (pc === this.pc) this.#send('offer', pc.localDescription.toJSON());
    } catch (err) {
      this.log(`could not make an offer: ${err.message}`);
    } finally {
      this.makingOffer = false;
    }
  }

  // The server said nobody else is in the call: our offer went nowhere.
  async offerUndelivered() {
    this.wantOffer = true;
    if (this.pc.signalingState === 'have-local-offer') {
      await this.pc.setLocalDescription({ type: 'rollback' }).catch(() => {});
    }
  }

  // Relayed offer / answer / candidate, applied strictly in arrival order.
  receive(type, payload) {
    this.chain = this.chain
      .then(() => this.#receive(type, payload ?? {}))
      .catch((err) => this.log(`${type} from peer failed: ${err.message}`));
  }

  async #receive(type, payload) {
    const { session: tag, target, ...body } = payload;
    const session = tag ?? null; // clients that do not tag their messages still work
    if (target && target !== this.session) return; // meant for a connection we closed
    if (type === 'candidate') {
      if (session === this.remoteSession) await this.#addCandidate(body);
      return;
    }
    if (type !== 'offer' && type !== 'answer') return;
    this.log(`received ${type} (signaling state ${this.pc.signalingState})`);
    if (this.remoteSession && session !== this.remoteSession) {
      if (type === 'answer') return;
      this.log('the other side has a new connection: starting over');
      this.reset();
    }
    this.remoteSession = session;
    await this.#onDescription({ type: body.type ?? type, sdp: body.sdp });
  }

  async #onDescription(description) {
    // Let our own offer in flight settle first: Chromium can leave ICE gathering stuck
    // when a rollback is queued behind a setLocalDescription that has not finished.
    await this.offering;
    const pc = this.pc;
    const readyForOffer = !this.makingOffer &&
      (pc.signalingState === 'stable' || this.settingRemoteAnswer);
    const collision = description.type === 'offer' && !readyForOffer;
    this.ignoreOffer = !this.polite && collision;
    if (this.ignoreOffer) {
      this.log('offers crossed: ignoring theirs (impolite side)');
      return;
    }
    if (collision) this.log('offers crossed: rolling back ours (polite side)');
    this.settingRemoteAnswer = description.type === 'answer';
    await pc.setRemoteDescription(description); // rolls back our offer on a collision
    this.settingRemoteAnswer = false;
    for (const candidate of this.pendingCandidates.splice(0)) await this.#addCandidate(candidate);
    if (description.type === 'offer') {
      await pc.setLocalDescription();
      this.#send('answer', pc.localDescription.toJSON());
    }
  }

  async #addCandidate(candidate) {
    if (!this.pc.remoteDescription) {
      this.pendingCandidates.push(candidate); // it arrived before its description
      return;
    }
    try {
      await this.pc.addIceCandidate(candidate);
    } catch (err) {
      if (!this.ignoreOffer) throw err;
    }
  }

  #send(type, body) {
    if (type !== 'candidate') this.log(`sending ${type}`);
    this.sendRaw(type, { ...body, session: this.session, target: this.remoteSession });
  }

  #create() {
    this.session = randomId();
    this.remoteSession = null;
    this.pendingCandidates = [];
    this.makingOffer = false;
    this.ignoreOffer = false;
    this.settingRemoteAnswer = false;
    this.wantOffer = false;
    this.offering = Promise.resolve();
    clearTimeout(this.iceTimer);
    const pc = this.pc = new RTCPeerConnection({ iceServers: this.iceServers });
    // Without a camera there is nothing to add: the answer to the other side's offer is
    // then receive-only. (Transceivers added here would not be matched to the offer's
    // m-lines and would force a second negotiation.)
    for (const track of this.localStream?.getTracks() ?? []) pc.addTrack(track, this.localStream);
    pc.onnegotiationneeded = () => this.negotiate();
    pc.onicecandidate = ({ candidate }) => {
      if (candidate && pc === this.pc) this.#send('candidate', candidate.toJSON());
    };
    pc.ontrack = ({ track, streams }) => this.onTrack(track, streams[0]);
    pc.onconnectionstatechange = () => {
      if (pc !== this.pc) return;
      if (pc.connectionState === 'connected') this.stallRestarts = 0;
      if (pc.connectionState === 'failed' && this.peerPresent) {
        this.log('media connection failed: restarting ICE');
        pc.restartIce();
      }
      this.onChange();
    };
    pc.onsignalingstatechange = () => {
      if (pc.signalingState === 'stable' && pc.remoteDescription) this.#watchIce(pc);
      this.onChange();
    };
  }

  // If ICE has not even started checking a while after a completed negotiation (no
  // candidates came through, or gathering got stuck), start over with a new connection:
  // the other side sees the new session and starts over too.
  #watchIce(pc) {
    clearTimeout(this.iceTimer);
    this.iceTimer = setTimeout(() => {
      if (pc !== this.pc || !this.peerPresent || pc.iceConnectionState !== 'new') return;
      if (this.stallRestarts >= ICE_STALL_RESTARTS) return;
      this.stallRestarts += 1;
      this.log('ICE did not start: starting over with a new connection');
      this.reset();
    }, ICE_STALL_MS);
  }
}

// ------------------------------------------------------------------------------- Demo

const $ = (id) => document.getElementById(id);

const REASONS = {
  ended: 'The call was ended.',
  removed: 'You were removed from the call.',
  expired: 'The call expired.',
  left: 'The call is over: a participant left.',
  timeout: 'The call is over: the other participant lost their connection.',
  unclaimed: 'The call is over: nobody joined in time.',
  max_duration: 'The call reached its maximum duration.',
  shutdown: 'The server is restarting; the call is over.',
  error: 'The call ended because of a server error.',
};

class Demo {
  constructor() {
    this.callId = null;
    this.me = null;            // { call_id, peer_id, peer_token, role, polite }
    this.state = null;         // the last `state` message
    this.phase = 'idle';       // idle | starting | in_call | ended | error
    this.notice = '';
    this.notices = new Map();
    this.signaling = null;
    this.peer = null;
    this.localStream = null;
    this.remoteStream = new MediaStream();
    this.renderedFrames = 0;
    this.events = [];
    this.iceServers = null;
  }

  init() {
    accessToken.take();
    $('new-call').onclick = () => this.newCall();
    $('copy-link').onclick = () => this.copyInvite();
    $('hang-up').onclick = () => this.hangUp();
    $('unmute').onclick = () => this.unmute();
    this.#countRemoteFrames();
    window.addEventListener('popstate', () => location.reload());
    const callId = new URLSearchParams(location.search).get('call');
    if (callId) this.openCall(callId);
    else this.render();
  }

  async newCall() {
    this.#setPhase('starting');
    try {
      const created = await api('POST', '/calls', { token: accessToken.get() });
      credentials.save(created);
      history.pushState(null, '', `/?call=${encodeURIComponent(created.call_id)}`);
      await this.enter(created);
    } catch (err) {
      this.#fail(this.#refusal(err) ?? `Could not create a call: ${err.message}`);
    }
  }

  // Opened from an invite link (or a reload): rejoin with stored credentials, else join.
  async openCall(callId) {
    this.#setPhase('starting');
    this.callId = callId;
    const stored = credentials.load(callId);
    if (stored) {
      this.log(`rejoining call ${callId} as ${stored.role}`);
      await this.enter(stored);
      return;
    }
    try {
      const joined = await api('POST', `/calls/${encodeURIComponent(callId)}/join`, { token: accessToken.get() });
      credentials.save(joined);
      await this.enter(joined);
    } catch (err) {
      const refusal = this.#refusal(err);
      if (refusal) {
        this.#fail(refusal);
      } else if (err.code === 'call_full') {
        this.#fail('This call is full: it already has two participants.');
      } else if (err.code === 'call_not_found') {
        this.#fail('This call does not exist: it has ended or expired.');
      } else {
        this.#fail(`Could not join the call: ${err.message}`);
      }
    }
  }

  async enter(me) {
    this.me = me;
    this.callId = me.call_id;
    this.state = null;
    this.notices.clear();
    this.#say('call', '');
    this.#setPhase('in_call');
    $('invite-link').value = new URL(`/?call=${encodeURIComponent(me.call_id)}`, location.href).href;
    await Promise.all([this.#loadIceServers(), this.#startCamera()]);
    if (this.phase !== 'in_call') return;
    this.peer = new Peer({
      iceServers: this.iceServers,
      polite: me.polite,
      localStream: this.localStream,
      send: (type, payload) => this.signaling.send(type, payload),
      onTrack: (track) => this.#addRemoteTrack(track),
      onChange: () => this.render(),
      log: (line) => this.log(line),
    });
    this.signaling = new Signaling({
      callId: me.call_id,
      peerId: me.peer_id,
      token: me.peer_token,
      onMessage: (message) => this.onMessage(message),
      onStatus: (status, detail) => this.onSocketStatus(status, detail),
    });
    this.signaling.start();
    this.render();
  }

  onMessage(message) {
    switch (message.type) {
      case 'state': return this.onState(message);
      case 'offer':
      case 'answer':
      case 'candidate': return this.peer.receive(message.type, message.payload);
      case 'call_ended': return this.finish(REASONS[message.reason] ?? 'The call is over.');
      case 'server_shutdown': return this.#say('call', message.reconnect ? '' : 'The server is restarting…');
      case 'error': return this.onError(message);
      default: return undefined;
    }
  }

  onState(state) {
    const firstAfterOpen = this.awaitingState;
    this.awaitingState = false;
    this.state = state;
    const other = state.subject && state.subject !== this.me.peer_id;
    if (other && state.event === 'left') {
      const why = state.reason === 'removed' ? 'was removed from the call' : 'left';
      this.#say('peer', `The other participant ${why}. Waiting for someone to join…`);
      for (const track of this.remoteStream.getTracks()) this.remoteStream.removeTrack(track);
    }
    if (other && state.event === 'disconnected') this.#say('peer', 'The other participant lost their connection to the server…');
    if (other && (state.event === 'joined' || state.event === 'connected')) this.#say('peer', '');
    this.peer.setPeerPresent(state.participants.count >= 2);
    if (other && state.event === 'connected') this.peer.peerReconnected();
    if (firstAfterOpen) this.peer.resync({ framesLost: this.resumeFailed });
    if (firstAfterOpen) this.resumeFailed = false;
    this.render();
  }

  onError(message) {
    if (message.code === 'no_peer') {
      this.peer.offerUndelivered();
      return;
    }
    if (message.code === 'resume_failed') {
      this.resumeFailed = true; // frames from the other side were lost: renegotiate
      return;
    }
    this.log(`server error ${message.code}: ${message.message}`);
  }

  onSocketStatus(status, detail) {
    const code = detail.code ? ` (close code ${detail.code})` : '';
    const resume = status === 'reconnecting' && detail.lastSeq != null ? ` (resuming after seq ${detail.lastSeq})` : '';
    this.log(`signaling ${status}${code}${resume}`);
    if (status === 'open') this.awaitingState = true;
    if (status === 'reconnecting' && detail.code === 1012) this.#say('socket', 'The server is restarting; reconnecting…');
    else if (status === 'reconnecting') this.#say('socket', `Connection to the server lost; reconnecting (attempt ${this.signaling?.attempt ?? 1})…`);
    if (status === 'open') this.#say('socket', '');
    if (status === 'closed' && detail.reason && this.phase === 'in_call') this.#socketClosed(detail);
    this.render();
  }

  #socketClosed({ code, reason }) {
    if (reason === 'replaced') {
      this.finish('This call was opened in another tab or window; this one stopped.', { keep: true });
    } else if (reason === 'call_not_found') {
      this.finish('This call does not exist any more: it has ended or expired.');
    } else if (reason === 'unauthorized') {
      this.finish('The server no longer accepts this tab\'s place in the call.');
    } else if (reason === 'closed') {
      this.finish('The server closed the connection.');
    } else if (reason === 'policy') {
      this.finish('The server closed the connection: too many messages.', { keep: true });
    } else {
      this.finish(`Lost the connection to the server (close code ${code}).`, { keep: true });
    }
  }

  async hangUp() {
    const me = this.me;
    if (!me) return;
    $('hang-up').disabled = true;
    try {
      await api('POST', `/calls/${encodeURIComponent(me.call_id)}/end`, { token: me.peer_token });
      this.finish(REASONS.ended);
    } catch (err) {
      if (err.status === 404 || err.status === 401) this.finish(REASONS.ended);
      else {
        $('hang-up').disabled = false;
        this.#say('call', `Could not hang up: ${err.message}`, true);
      }
    }
  }

  // Leave the call locally; `keep` keeps the stored credentials (another tab may use them).
  finish(message, { keep = false } = {}) {
    if (this.phase === 'ended') return;
    if (this.me && !keep) credentials.clear(this.me.call_id);
    this.signaling?.stop();
    this.peer?.close();
    for (const track of this.localStream?.getTracks() ?? []) track.stop();
    this.localStream = null;
    $('local-video').srcObject = null;
    for (const track of this.remoteStream.getTracks()) this.remoteStream.removeTrack(track);
    $('remote-video').srcObject = null;
    this.#setPhase('ended');
    this.notices.clear();
    this.#say('call', message);
  }

  async copyInvite() {
    const link = $('invite-link').value;
    try {
      await navigator.clipboard.writeText(link);
      $('copy-link').textContent = 'Copied';
    } catch {
      $('invite-link').select();
      $('copy-link').textContent = 'Press Ctrl+C';
    }
    setTimeout(() => { $('copy-link').textContent = 'Copy'; }, 2000);
  }

  unmute() {
    const video = $('remote-video');
    video.muted = false;
    video.play().catch(() => {});
    $('unmute').hidden = true;
  }

  log(line) {
    this.events.push(`${new Date().toISOString()} ${line}`);
    if (this.events.length > 200) this.events.shift();
    console.info('[demo]', line);
  }

  async #loadIceServers() {
    if (this.iceServers) return;
    try {
      this.iceServers = (await api('GET', '/config')).ice_servers ?? [];
    } catch (err) {
      this.log(`no ICE servers from /apiv2/config: ${err.message}`);
      this.iceServers = [];
    }
  }

  async #startCamera() {
    if (this.localStream) return;
    try {
      if (!navigator.mediaDevices) throw new DOMException('this page is not served over HTTPS', 'SecurityError');
      this.localStream = await navigator.mediaDevices.getUserMedia({ video: true, audio: true });
      $('local-video').srcObject = this.localStream;
    } catch (err) {
      const why = err.name === 'NotAllowedError' ? 'access was refused'
        : err.name === 'NotFoundError' ? 'no camera or microphone was found'
          : (err.message || err.name);
      this.#say('media', `Camera and microphone are not available (${why}). You can still see and hear the other participant; they cannot see or hear you.`);
      this.log(`getUserMedia failed: ${err.name}`);
    }
  }

  #addRemoteTrack(track) {
    for (const old of this.remoteStream.getTracks()) {
      if (old.kind === track.kind && old !== track) this.remoteStream.removeTrack(old);
    }
    if (!this.remoteStream.getTracks().includes(track)) this.remoteStream.addTrack(track);
    const video = $('remote-video');
    // Attached only now: a media element without data would hold back the page's load event.
    if (video.srcObject !== this.remoteStream) video.srcObject = this.remoteStream;
    video.play().catch(() => {
      // Autoplay with sound needs a click on this page; play muted until then.
      video.muted = true;
      video.play().catch(() => {});
      $('unmute').hidden = false;
    });
  }

  #countRemoteFrames() {
    const video = $('remote-video');
    if (!('requestVideoFrameCallback' in video)) return;
    const tick = () => {
      this.renderedFrames += 1;
      video.requestVideoFrameCallback(tick);
    };
    video.requestVideoFrameCallback(tick);
  }

  #setPhase(phase) {
    this.phase = phase;
    this.render();
  }

  #fail(message) {
    this.#setPhase('error');
    this.#say('call', message, true);
  }

  // A server with auth=jwt refusing this page's token (or its lack of one).
  #refusal(err) {
    if (err.code === 'unauthorized') {
      return accessToken.get()
        ? `The server did not accept your sign-in token (${err.message}). Open this page again from your application.`
        : 'This server admits only signed-in users: open this page from your application.';
    }
    if (err.code === 'forbidden') return `Your sign-in token does not allow this (${err.message}).`;
    return null;
  }

  // Notices come in slots (media, call, peer, socket) so one clears without hiding another.
  #say(slot, message, isError = false) {
    if (message) this.notices.set(slot, { message, isError });
    else this.notices.delete(slot);
    const shown = [...this.notices.values()];
    this.notice = shown.map((n) => n.message).join(' ');
    const notice = $('notice');
    notice.textContent = this.notice;
    notice.hidden = !this.notice;
    notice.classList.toggle('error', shown.some((n) => n.isError));
  }

  render() {
    const inCall = this.phase === 'in_call';
    $('start').hidden = inCall || this.phase === 'starting';
    $('new-call').disabled = this.phase === 'starting';
    $('invite').hidden = !inCall;
    $('status').hidden = !this.me;
    $('videos').hidden = !inCall;
    $('controls').hidden = !inCall;
    $('hang-up').disabled = !inCall;
    const s = this.state;
    $('call-status').textContent = this.phase === 'ended' ? 'ended' : s?.status ?? '–';
    $('participants').textContent = s && this.phase !== 'ended'
      ? `${s.participants.count} of ${s.participants.max} joined, ${s.participants.connected} connected`
      : '–';
    $('socket-status').textContent = this.signaling?.status ?? '–';
    const peer = this.phase === 'ended' ? null : s?.peer;
    $('peer-name').textContent = peer ? (peer.name ?? peer.identity ?? 'anonymous') : '–';
    $('peer-status').textContent = this.peer ? this.peer.pc.connectionState : '–';
  }
}

const app = new Demo();

// Read-only view for tests and the console.
window.demo = Object.freeze({
  get pc() { return app.peer?.pc ?? null; },
  get state() { return app.state; },
  get peer() { return app.state?.peer ?? null; },
  get callId() { return app.callId; },
  get role() { return app.me?.role ?? null; },
  get polite() { return app.me?.polite ?? null; },
  get phase() { return app.phase; },
  get notice() { return app.notice; },
  get socket() { return app.signaling?.status ?? null; },
  get sending() { return Boolean(app.localStream); },
  get remoteVideo() { return $('remote-video'); },
  // Frames of the remote video decoded so far, and frames painted (painting pauses in a
  // background tab; decoding does not).
  get remoteFrames() { return $('remote-video').getVideoPlaybackQuality().totalVideoFrames; },
  get renderedFrames() { return app.renderedFrames; },
  get events() { return [...app.events]; },
});

app.init();
