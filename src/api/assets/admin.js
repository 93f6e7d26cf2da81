// The operator's page. The admin token lives in sessionStorage only and goes to this server as
// `Authorization: Bearer <token>`.
(function () {
  const TOKEN_STORE = 'gemini-meter.admin-token';
  const $ = (sel) => document.querySelector(sel);
  let token = null;
  let daily = null;
  let last = null; // the latest answers, to re-draw on resize
  let usageMetric = 'messages';
  let generation = 0;
  let timer = null;

  class AuthError extends Error {}

  function store() {
    try { return window.sessionStorage; } catch (_) { return null; }
  }

  async function api(path) {
    let resp;
    try {
      resp = await fetch(path, { headers: { authorization: 'Bearer ' + token }, cache: 'no-store', credentials: 'omit' });
    } catch (_) {
      throw new Error('Could not reach the gateway.');
    }
    if (resp.status === 401) throw new AuthError('This admin token is not valid.');
    if (!resp.ok) {
      const msg = await GM.errorMessage(resp);
      if (resp.status === 403) throw new AuthError(msg);
      throw new Error(msg);
    }
    return resp.json();
  }

  function show(id, on) { $(id).hidden = !on; }

  function showForm(error) {
    generation++;
    clearInterval(timer);
    token = null;
    last = null;
    const s = store();
    if (s) s.removeItem(TOKEN_STORE);
    for (const id of ['#analytics', '#loading', '#load-error', '#sign-out', '#refresh']) show(id, false);
    $('#updated').textContent = '';
    show('#token-form', true);
    const err = $('#token-error');
    err.textContent = error || '';
    err.hidden = !error;
    $('#token-input').value = '';
    $('#token-input').focus();
  }

  function thisMonth() {
    return new Date().toISOString().slice(0, 7);
  }

  async function signIn(t) {
    generation++;
    token = t;
    show('#token-form', false);
    show('#loading', true);
    const ok = await load(true);
    if (!ok) return;
    const s = store();
    if (s) s.setItem(TOKEN_STORE, t);
    clearInterval(timer);
    timer = setInterval(() => load(false), 60000);
  }

  async function load(first) {
    const gen = generation;
    const month = $('#month').value || thisMonth();
    const m = encodeURIComponent(month);
    try {
      const [summary, d, byCost, byTokens, byMessages, models] = await Promise.all([
        api('/admin/analytics/summary?month=' + m),
        api('/admin/analytics/daily?days=30'),
        api('/admin/analytics/top-users?by=cost&limit=10&month=' + m),
        api('/admin/analytics/top-users?by=tokens&limit=10&month=' + m),
        api('/admin/analytics/top-users?by=messages&limit=10&month=' + m),
        api('/admin/analytics/models?month=' + m),
      ]);
      if (gen !== generation) return false;
      show('#loading', false);
      show('#load-error', false);
      show('#analytics', true);
      show('#sign-out', true);
      show('#refresh', true);
      daily = d;
      last = { month, summary, byCost, byTokens, byMessages, models };
      render();
      $('#updated').textContent = 'Updated ' + new Date().toLocaleTimeString();
      return true;
    } catch (e) {
      if (gen !== generation) return false;
      if (e instanceof AuthError) { showForm(e.message); return false; }
      show('#loading', false);
      $('#load-error').textContent = e.message;
      show('#load-error', true);
      if (first) show('#sign-out', true);
      return false;
    }
  }

  function render() {
    if (!last) return;
    renderSummary(last.summary);
    renderDaily();
    renderTop('cost', last.byCost.data, (r) => GM.money(r.cost), (r) => Number(r.cost));
    renderTop('tokens', last.byTokens.data, (r) => GM.int(r.tokens), (r) => r.tokens);
    renderTop('messages', last.byMessages.data, (r) => GM.int(r.messages), (r) => r.messages);
    renderModels(last.models, last.summary);
    $('#top-month').textContent = '· ' + last.month;
    $('#models-month').textContent = last.month;
  }

  function renderSummary(s) {
    const fmt = { cost: GM.money, messages: GM.int, tokens: GM.int, bytes: GM.bytes, active_users: GM.int };
    for (const k in fmt) {
      const node = document.querySelector('[data-stat="' + k + '"] .value');
      node.textContent = fmt[k](s[k]);
      node.title = String(s[k]);
      node.dataset.value = String(s[k]);
    }
  }

  function renderDaily() {
    if (!daily) return;
    const days = GM.dayRange(daily.since, daily.days);
    GM.stackedBars($('#revenue-chart'), {
      days,
      series: GM.seriesByType(daily.data, days, 'cost'),
      title: 'Revenue per day by type',
      format: (v) => '$' + GM.short(v),
      tooltip: (v) => GM.money(String(v)),
      empty: 'No revenue in the last 30 days',
    });
    GM.stackedBars($('#usage-chart'), {
      days,
      series: GM.seriesByType(daily.data, days, usageMetric),
      title: 'Usage per day by type (' + usageMetric + ')',
      format: usageMetric === 'bytes' ? GM.bytes : GM.short,
      tooltip: usageMetric === 'bytes' ? GM.bytes : GM.int,
      empty: 'No usage in the last 30 days',
    });
  }

  function renderTop(by, rows, text, value) {
    const container = document.querySelector('#top-users [data-by="' + by + '"] .chart');
    GM.hbars(container, rows.map((r) => ({ label: r.user_id, value: value(r), text: text(r) })), {
      title: 'Top users by ' + by, color: '#6366f1', empty: 'No usage this month',
    });
  }

  function renderModels(models, summary) {
    const rows = models.data.slice().sort((a, b) => Number(b.cost) - Number(a.cost) || b.tokens - a.tokens);
    GM.hbars($('#models-chart'), rows.map((r) => ({ label: r.model, value: Number(r.cost), text: GM.money(r.cost) })), {
      title: 'Revenue by model', color: '#0ea5e9', empty: 'No model usage this month',
    });
    const body = $('#models tbody');
    GM.clear(body);
    const total = Number(summary.cost) || 0;
    for (const r of rows) {
      const tr = GM.h('tr', { 'data-model': r.model });
      const td = (t, cls, title) => {
        const c = GM.h('td', cls ? { class: cls } : {}, t);
        if (title) c.title = title;
        tr.appendChild(c);
      };
      td(r.model, 'name');
      td(GM.int(r.requests), 'num');
      td(GM.int(r.messages), 'num');
      td(GM.int(r.tokens), 'num');
      td(GM.money(r.cost), 'num', r.cost);
      td(total > 0 ? (Number(r.cost) / total * 100).toFixed(1) + '%' : '–', 'num');
      body.appendChild(tr);
    }
  }

  $('#token-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const t = $('#token-input').value.trim();
    if (!t) { showForm('Enter the admin token.'); return; }
    signIn(t);
  });
  $('#sign-out').addEventListener('click', () => showForm());
  $('#refresh').addEventListener('click', () => load(false));
  $('#month').addEventListener('change', () => load(false));
  for (const b of document.querySelectorAll('#usage-metric button')) {
    b.addEventListener('click', () => {
      usageMetric = b.dataset.metric;
      for (const o of document.querySelectorAll('#usage-metric button')) o.setAttribute('aria-pressed', String(o === b));
      renderDaily();
    });
  }
  GM.onResize(render);

  $('#month').value = thisMonth();
  const s = store();
  const saved = s && s.getItem(TOKEN_STORE);
  if (saved) signIn(saved); else showForm();
})();
