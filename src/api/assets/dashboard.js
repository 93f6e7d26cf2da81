// The usage page. The key comes from the form or from `#key=` in the URL fragment (which is
// removed from the address bar at once), lives in sessionStorage only, and goes to this server
// as the x-goog-api-key header.
(function () {
  const KEY_STORE = 'gemini-meter.key';
  const $ = (sel) => document.querySelector(sel);
  const QUOTAS = [
    { key: 'messages', noun: 'messages', limitName: 'message', fmt: GM.int },
    { key: 'tokens', noun: 'tokens', limitName: 'token', fmt: GM.int },
    { key: 'bytes', noun: 'storage', limitName: 'storage', fmt: GM.bytes },
    { key: 'cost', noun: 'spending', limitName: 'spending', fmt: GM.money },
  ];

  let key = null;
  let stream = null; // AbortController of the live stream
  let refreshTimer = null;
  let metric = 'messages';
  let daily = null;
  let generation = 0; // bumps on every sign-in/out so late answers of an old key are ignored

  class AuthError extends Error {}

  function store() {
    try { return window.sessionStorage; } catch (_) { return null; }
  }

  function keyFromFragment() {
    const m = /(?:^#|&)key=([^&]*)/.exec(location.hash);
    if (!m) return null;
    // Out of the address bar and the history at once.
    history.replaceState(null, '', location.pathname + location.search);
    try { return decodeURIComponent(m[1]).trim(); } catch (_) { return m[1].trim(); }
  }

  async function api(path, signal) {
    let resp;
    try {
      resp = await fetch(path, { headers: { 'x-goog-api-key': key }, cache: 'no-store', credentials: 'omit', signal });
    } catch (e) {
      if (signal && signal.aborted) throw e;
      throw new Error('Could not reach the gateway. Check your connection and reload the page.');
    }
    if (resp.status === 401) {
      const msg = await GM.errorMessage(resp);
      throw new AuthError(msg.startsWith('Missing') ? 'Enter your API key.' :
        'This key is not valid. Check that you copied all of it (keys start with gm_), or ask for a new one.');
    }
    if (!resp.ok) throw new Error(await GM.errorMessage(resp));
    return resp.json();
  }

  function show(id, on) { $(id).hidden = !on; }

  function showForm(error) {
    show('#usage', false);
    show('#loading', false);
    show('#load-error', false);
    show('#sign-out', false);
    show('#live', false);
    show('#key-form', true);
    const err = $('#key-error');
    err.textContent = error || '';
    err.hidden = !error;
    const input = $('#key-input');
    input.value = '';
    input.focus();
  }

  function signOut(error) {
    generation++;
    stopStream();
    clearTimeout(refreshTimer);
    key = null;
    const s = store();
    if (s) s.removeItem(KEY_STORE);
    showForm(error);
  }

  async function signIn(k) {
    generation++;
    const gen = generation;
    stopStream();
    key = k;
    show('#key-form', false);
    show('#key-error', false);
    show('#load-error', false);
    show('#loading', true);
    let cur;
    try {
      cur = await api('/api/usage/current');
    } catch (e) {
      if (gen !== generation) return;
      if (e instanceof AuthError) { signOut(e.message); return; }
      show('#loading', false);
      $('#load-error').textContent = e.message;
      show('#load-error', true);
      show('#sign-out', true);
      return;
    }
    if (gen !== generation) return;
    const s = store();
    if (s) s.setItem(KEY_STORE, k);
    show('#loading', false);
    show('#usage', true);
    show('#sign-out', true);
    renderCurrent(cur);
    refreshDetails();
    startStream();
  }

  // ---- rendering ----

  function pctText(p) {
    if (p >= 10 || p === 0) return Math.floor(p) + '%';
    return (Math.floor(p * 10) / 10) + '%';
  }

  function setQuota(q, c) {
    const node = document.querySelector('.quota[data-quota="' + q.key + '"]');
    const used = c.current_month[q.key];
    const limit = c.limits[q.key];
    const pct = c.percentage[q.key];
    const fill = node.querySelector('.fill');
    const bar = node.querySelector('.bar');
    const text = node.querySelector('.text');
    const pctEl = node.querySelector('.pct');
    if (limit === null || limit === undefined) {
      text.textContent = q.fmt(used) + ' ' + q.noun + ' · unlimited';
      fill.style.width = '0%';
      bar.classList.add('unlimited');
      bar.removeAttribute('aria-valuenow');
      if (pctEl) pctEl.textContent = 'Unlimited';
      node.dataset.limited = 'false';
      return null;
    }
    const p = Number(pct) || 0;
    text.textContent = q.fmt(used) + ' / ' + q.fmt(limit) + ' ' + q.noun;
    // Held by calls in flight (hard enforcement): shown apart, replaced by usage as they end.
    const held = c.reserved ? c.reserved[q.key] : undefined;
    if (held !== undefined && Number(held) > 0) text.textContent += ' · ' + q.fmt(held) + ' in flight';
    fill.style.width = Math.min(100, p) + '%';
    fill.classList.toggle('warn', p >= 75 && p < 90);
    fill.classList.toggle('bad', p >= 90);
    bar.classList.remove('unlimited');
    bar.setAttribute('aria-valuenow', String(Math.min(100, p)));
    if (pctEl) pctEl.textContent = pctText(p);
    node.dataset.limited = 'true';
    return { q, p, used, limit };
  }

  function fmtDate(iso) {
    const d = new Date(iso);
    return GM.MONTHS[d.getUTCMonth()] + ' ' + d.getUTCDate() + ', ' + d.getUTCFullYear();
  }

  function resetText(iso) {
    const ms = new Date(iso).getTime() - Date.now();
    const hours = Math.max(0, Math.ceil(ms / 3600000));
    const rel = hours <= 24 ? (hours <= 1 ? 'in less than an hour' : 'in ' + hours + ' hours')
      : 'in ' + Math.ceil(hours / 24) + ' days';
    return 'Resets ' + fmtDate(iso) + ' (' + rel + ')';
  }

  function monthText(m) {
    const [y, mo] = m.split('-').map(Number);
    return ['January', 'February', 'March', 'April', 'May', 'June', 'July', 'August', 'September',
      'October', 'November', 'December'][mo - 1] + ' ' + y;
  }

  function renderCurrent(c) {
    $('#plan-name').textContent = c.tier;
    $('#plan-name-2').textContent = c.tier;
    $('#month').textContent = monthText(c.month);
    $('#reset').textContent = resetText(c.resets_at);
    $('#reset').dataset.resetsAt = c.resets_at;
    const cost = $('#cost-total');
    cost.textContent = GM.money(c.current_month.cost);
    cost.title = c.current_month.cost;
    cost.dataset.exact = c.current_month.cost;
    const costQuota = document.querySelector('.quota[data-quota="cost"]');
    costQuota.hidden = c.limits.cost === null || c.limits.cost === undefined;
    const near = [];
    for (const q of QUOTAS) {
      const r = setQuota(q, c);
      if (r && r.p >= 90) near.push(r);
    }
    if (!costQuota.hidden) costQuota.querySelector('.text').textContent += ' limit';
    renderBanner(near);
    renderPlan(c);
  }

  function renderBanner(near) {
    const banner = $('#banner');
    if (near.length === 0) { banner.hidden = true; return; }
    near.sort((a, b) => b.p - a.p);
    const top = near[0];
    const amount = top.q.fmt(top.used) + ' / ' + top.q.fmt(top.limit);
    let msg = top.p >= 100
      ? 'You have reached your monthly ' + top.q.limitName + ' limit (' + amount + ').'
      : 'You have used ' + Math.floor(top.p) + '% of your monthly ' + top.q.noun + ' (' + amount + ').';
    if (near.length > 1) {
      msg += ' Also near the limit: ' + near.slice(1).map((r) => r.q.noun + ' (' + Math.floor(r.p) + '%)').join(', ') + '.';
    }
    $('#banner-text').textContent = msg + ' ';
    banner.classList.toggle('full', top.p >= 100);
    banner.dataset.quota = top.q.key;
    banner.hidden = false;
  }

  function renderPlan(c) {
    const l = c.limits;
    const part = (v, fmt, noun) => (v === null || v === undefined ? 'unlimited ' + noun : fmt(v) + ' ' + noun);
    let text = 'Monthly limits: ' + part(l.messages, GM.int, 'messages') + ', ' + part(l.tokens, GM.int, 'tokens') +
      ', ' + part(l.bytes, GM.bytes, 'of storage') + ', ' + (l.cost ? GM.money(l.cost) + ' spending cap' : 'no spending cap') + '.';
    if (l.requests_per_minute) text += ' Up to ' + GM.int(l.requests_per_minute) + ' requests a minute per key.';
    if (l.models && l.models.length) text += ' Models: ' + l.models.join(', ') + '.';
    $('#plan-limits').textContent = text;
  }

  function cell(tr, text, cls, title) {
    const td = GM.h('td', cls ? { class: cls } : {}, text);
    if (title) td.title = title;
    tr.appendChild(td);
    return td;
  }

  function renderBreakdown(b) {
    const byType = $('#by-type tbody');
    GM.clear(byType);
    for (const t of GM.TYPES) {
      const row = b.by_type.find((r) => r.type === t.key);
      if (!row) continue;
      const tr = GM.h('tr', { 'data-type': t.key });
      cell(tr, t.label);
      cell(tr, GM.int(row.records), 'num');
      cell(tr, GM.money(row.cost), 'num', row.cost);
      byType.appendChild(tr);
    }
    const total = GM.h('tr', { 'data-type': 'total' });
    cell(total, 'Total');
    cell(total, GM.int(b.total.records), 'num');
    cell(total, GM.money(b.total.cost), 'num', b.total.cost).style.fontWeight = '650';
    byType.appendChild(total);

    const byModel = $('#by-model tbody');
    GM.clear(byModel);
    if (b.by_model.length === 0) {
      const tr = GM.h('tr');
      const td = cell(tr, 'No requests yet this month.', 'muted');
      td.colSpan = 4;
      byModel.appendChild(tr);
    }
    for (const row of b.by_model) {
      const tr = GM.h('tr', { 'data-model': row.model === null ? '' : row.model });
      cell(tr, row.model === null ? 'Uploads & other' : row.model, 'name');
      cell(tr, GM.int(row.messages), 'num');
      cell(tr, GM.int(row.tokens), 'num');
      cell(tr, GM.money(row.cost), 'num', row.cost);
      byModel.appendChild(tr);
    }
    const note = $('#models-note');
    note.hidden = b.models_complete;
    note.textContent = b.models_complete ? '' : 'Based on your latest ' + GM.int(b.records_scanned) + ' records this month.';
  }

  function renderChart() {
    if (!daily) return;
    const days = GM.dayRange(daily.since, daily.days);
    // Only the record types that have any of this metric (messages: only message_sent).
    const series = GM.seriesByType(daily.data, days, metric).filter((s) => s.values.some((v) => v > 0));
    const isCost = metric === 'cost';
    GM.stackedBars($('#daily-chart'), {
      days,
      series,
      title: 'Daily ' + metric + ', last 30 days',
      format: isCost ? (v) => '$' + GM.short(v) : GM.short,
      tooltip: isCost ? (v) => GM.money(String(v)) : GM.int,
      empty: 'No usage in the last 30 days',
      legend: series.length > 1,
    });
  }

  // Local time: today's as the time of day, older ones with their date.
  function timeText(iso) {
    const d = new Date(iso);
    const pad = (n) => String(n).padStart(2, '0');
    const clock = pad(d.getHours()) + ':' + pad(d.getMinutes()) + ':' + pad(d.getSeconds());
    if (d.toDateString() === new Date().toDateString()) return clock;
    return GM.MONTHS[d.getMonth()] + ' ' + d.getDate() + ', ' + clock.slice(0, 5);
  }

  function renderRecent(page) {
    const body = $('#recent tbody');
    GM.clear(body);
    if (page.data.length === 0) {
      const tr = GM.h('tr');
      cell(tr, 'Nothing yet this month.', 'muted').colSpan = 5;
      body.appendChild(tr);
    }
    for (const r of page.data) {
      const tr = GM.h('tr', { 'data-id': r.id });
      cell(tr, timeText(r.created_at), null, r.created_at);
      cell(tr, GM.typeLabel(r.type));
      cell(tr, (r.metadata && r.metadata.model) || '', 'name');
      cell(tr, r.type === 'file_upload' ? GM.bytes(r.bytes) : GM.int(r.tokens), 'num');
      cell(tr, GM.money(r.cost), 'num', r.cost);
      body.appendChild(tr);
    }
  }

  async function refreshDetails() {
    const gen = generation;
    try {
      const [d, b, h] = await Promise.all([
        api('/api/usage/daily?days=30'), api('/api/usage/breakdown'), api('/api/usage/history?limit=10'),
      ]);
      if (gen !== generation) return;
      daily = d;
      renderChart();
      renderBreakdown(b);
      renderRecent(h);
    } catch (e) {
      if (gen !== generation) return;
      if (e instanceof AuthError) signOut(e.message);
    }
  }

  function scheduleRefresh() {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(refreshDetails, 600);
  }

  // ---- live updates: Server-Sent Events read with fetch (EventSource cannot send headers) ----

  function setLive(on, text) {
    const live = $('#live');
    live.hidden = false;
    live.classList.toggle('on', on);
    $('#live-text').textContent = text;
  }

  function stopStream() {
    if (stream) stream.abort();
    stream = null;
  }

  function handleBlock(block) {
    let event = 'message';
    const data = [];
    for (const line of block.split('\n')) {
      if (line === '' || line.startsWith(':')) continue;
      const i = line.indexOf(':');
      const field = i < 0 ? line : line.slice(0, i);
      let value = i < 0 ? '' : line.slice(i + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'event') event = value;
      else if (field === 'data') data.push(value);
    }
    if (event !== 'usage' || data.length === 0) return;
    let cur;
    try { cur = JSON.parse(data.join('\n')); } catch (_) { return; }
    renderCurrent(cur);
    scheduleRefresh();
  }

  async function runStream(ctl, gen) {
    let delay = 1000;
    while (!ctl.signal.aborted && gen === generation) {
      try {
        const resp = await fetch('/api/usage/stream', {
          headers: { 'x-goog-api-key': key, accept: 'text/event-stream' },
          cache: 'no-store', credentials: 'omit', signal: ctl.signal,
        });
        if (resp.status === 401) { signOut('This key is no longer valid.'); return; }
        if (!resp.ok || !resp.body) throw new Error('HTTP ' + resp.status);
        setLive(true, 'Live');
        delay = 1000;
        const reader = resp.body.getReader();
        const decoder = new TextDecoder();
        let buf = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += decoder.decode(value, { stream: true }).replace(/\r\n?/g, '\n');
          let i;
          while ((i = buf.indexOf('\n\n')) >= 0) {
            handleBlock(buf.slice(0, i));
            buf = buf.slice(i + 2);
          }
        }
      } catch (_) {
        if (ctl.signal.aborted) return;
      }
      if (ctl.signal.aborted || gen !== generation) return;
      setLive(false, 'Reconnecting…');
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 30000);
    }
  }

  function startStream() {
    stopStream();
    stream = new AbortController();
    setLive(false, 'Connecting…');
    runStream(stream, generation);
  }

  // ---- statement download: fetched with the key header, saved from a blob (a plain link
  // would have to carry the key in its URL) ----

  async function downloadStatement(format) {
    const err = $('#statement-error');
    err.hidden = true;
    const month = $('#statement-month').value;
    const q = '?format=' + format + (month ? '&month=' + encodeURIComponent(month) : '');
    let resp;
    try {
      resp = await fetch('/api/usage/statement' + q, { headers: { 'x-goog-api-key': key }, cache: 'no-store', credentials: 'omit' });
    } catch (_) {
      resp = null;
    }
    if (!resp || !resp.ok) {
      err.textContent = resp ? await GM.errorMessage(resp) : 'Could not reach the gateway.';
      err.hidden = false;
      return;
    }
    const blob = await resp.blob();
    const url = URL.createObjectURL(blob);
    const a = GM.h('a', { href: url, download: 'statement-' + (month || 'this-month') + '.' + format });
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  // ---- wiring ----

  $('#key-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const k = $('#key-input').value.trim();
    if (!k) { showForm('Enter your API key.'); return; }
    signIn(k);
  });
  $('#sign-out').addEventListener('click', () => signOut());
  $('#statement-pdf').addEventListener('click', () => downloadStatement('pdf'));
  $('#statement-csv').addEventListener('click', () => downloadStatement('csv'));
  {
    const now = new Date();
    $('#statement-month').value = now.getUTCFullYear() + '-' + String(now.getUTCMonth() + 1).padStart(2, '0');
  }
  for (const b of document.querySelectorAll('#metric button')) {
    b.addEventListener('click', () => {
      metric = b.dataset.metric;
      for (const o of document.querySelectorAll('#metric button')) o.setAttribute('aria-pressed', String(o === b));
      renderChart();
    });
  }
  window.addEventListener('hashchange', () => {
    const k = keyFromFragment();
    if (k) signIn(k);
  });
  GM.onResize(renderChart);

  const s = store();
  const initial = keyFromFragment() || (s && s.getItem(KEY_STORE));
  if (initial) signIn(initial); else showForm();
})();
