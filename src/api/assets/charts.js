'use strict';
// Small SVG charts and formatting helpers shared by both pages. Every text goes in through
// textContent, never as markup.
const GM = (function () {
  const NS = 'http://www.w3.org/2000/svg';
  const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];
  const TYPES = [
    { key: 'message_sent', label: 'Messages sent', color: '#6366f1' },
    { key: 'ai_response', label: 'AI responses', color: '#0ea5e9' },
    { key: 'file_upload', label: 'File uploads', color: '#f59e0b' },
    { key: 'cache_storage', label: 'Cache storage', color: '#10b981' },
  ];

  function el(name, attrs, text) {
    const e = document.createElementNS(NS, name);
    for (const k in attrs || {}) e.setAttribute(k, String(attrs[k]));
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function h(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const k in attrs || {}) {
      if (k === 'class') e.className = attrs[k];
      else e.setAttribute(k, String(attrs[k]));
    }
    if (text !== undefined) e.textContent = text;
    return e;
  }

  const intFmt = new Intl.NumberFormat('en-US');
  function int(n) { return intFmt.format(Number(n) || 0); }

  function bytes(n) {
    n = Number(n) || 0;
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    const s = i === 0 ? String(n) : (n >= 100 ? n.toFixed(0) : n >= 10 ? n.toFixed(1) : n.toFixed(2));
    return s.replace(/\.0+$/, '').replace(/(\.\d*?)0+$/, '$1') + ' ' + units[i];
  }

  // Money arrives as an exact decimal string (shown exactly in a tooltip by the callers); on
  // screen: cents from $1 up, four significant digits below.
  function money(s) {
    const v = Number(s) || 0;
    const a = Math.abs(v);
    if (a === 0) return '$0.00';
    let text;
    if (a >= 1) {
      text = a.toLocaleString('en-US', { minimumFractionDigits: 2, maximumFractionDigits: 2 });
    } else {
      text = Number(a.toPrecision(4)).toFixed(Math.max(2, Math.min(12, 3 - Math.floor(Math.log10(a)))));
      text = text.replace(/(\.\d\d\d*?)0+$/, '$1');
    }
    return (v < 0 ? '-$' : '$') + text;
  }

  function short(n) {
    n = Number(n) || 0;
    const a = Math.abs(n);
    if (a >= 1e9) return (n / 1e9).toFixed(a >= 1e10 ? 0 : 1).replace(/\.0$/, '') + 'B';
    if (a >= 1e6) return (n / 1e6).toFixed(a >= 1e7 ? 0 : 1).replace(/\.0$/, '') + 'M';
    if (a >= 1e3) return (n / 1e3).toFixed(a >= 1e4 ? 0 : 1).replace(/\.0$/, '') + 'k';
    if (a > 0 && a < 1) return String(Number(n.toPrecision(2)));
    return String(Math.round(n * 100) / 100);
  }

  function dayLabel(day) {
    const [, m, d] = day.split('-').map(Number);
    return MONTHS[m - 1] + ' ' + d;
  }

  // The `days` calendar days (YYYY-MM-DD, UTC) starting at `since`.
  function dayRange(since, days) {
    const [y, m, d] = since.split('-').map(Number);
    const out = [];
    for (let i = 0; i < days; i++) out.push(new Date(Date.UTC(y, m - 1, d + i)).toISOString().slice(0, 10));
    return out;
  }

  // A round maximum and step for an axis reaching `max`.
  function niceScale(max, ticks) {
    if (!(max > 0)) return { max: 1, step: 0.25 };
    const raw = max / ticks;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || 10 * mag;
    return { max: step * Math.ceil(max / step), step };
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

  function widthOf(container) { return Math.max(280, Math.floor(container.clientWidth || 600)); }

  // Stacked bars, one per day. series: [{key, label, color, values: [number per day]}].
  function stackedBars(container, opts) {
    clear(container);
    const days = opts.days;
    const series = opts.series;
    const fmt = opts.format || short;
    const W = widthOf(container);
    const H = opts.height || 220;
    const peakGuess = Math.max(0, ...days.map((_, i) => series.reduce((a, s) => a + (Number(s.values[i]) || 0), 0)));
    const guess = niceScale(peakGuess, 4);
    const widest = Math.max(...[0, 1, 2, 3, 4].map((i) => fmt(guess.step * i).length));
    const pad = { l: Math.max(30, widest * 6.5 + 12), r: 8, t: 10, b: 24 };
    const pw = W - pad.l - pad.r;
    const ph = H - pad.t - pad.b;
    const totals = days.map((_, i) => series.reduce((a, s) => a + (Number(s.values[i]) || 0), 0));
    const peak = Math.max(0, ...totals);
    const scale = niceScale(peak, 4);
    const svg = el('svg', {
      viewBox: '0 0 ' + W + ' ' + H, width: W, height: H, role: 'img',
      'aria-label': opts.title || 'chart', 'data-peak': peak,
    });
    for (let v = 0; v <= scale.max + 1e-12; v += scale.step) {
      const y = pad.t + ph - (v / scale.max) * ph;
      svg.appendChild(el('line', { class: 'grid-line', x1: pad.l, x2: W - pad.r, y1: y, y2: y }));
      svg.appendChild(el('text', { x: pad.l - 6, y: y + 4, 'text-anchor': 'end' }, fmt(v)));
    }
    const band = pw / Math.max(1, days.length);
    const bw = Math.max(2, band * 0.72);
    const every = Math.max(1, Math.ceil(52 / band));
    days.forEach((day, i) => {
      const x = pad.l + i * band + (band - bw) / 2;
      let y = pad.t + ph;
      for (const s of series) {
        const v = Number(s.values[i]) || 0;
        if (v <= 0) continue;
        const hgt = Math.max(1, (v / scale.max) * ph);
        y -= hgt;
        const r = el('rect', {
          class: 'bar', x: x.toFixed(2), y: y.toFixed(2), width: bw.toFixed(2), height: hgt.toFixed(2),
          fill: s.color, 'data-day': day, 'data-series': s.key, 'data-value': v,
        });
        r.appendChild(el('title', {}, dayLabel(day) + ' · ' + s.label + ': ' + (opts.tooltip || fmt)(v)));
        svg.appendChild(r);
      }
      if ((days.length - 1 - i) % every === 0) {
        // Labels near an edge are anchored inside the chart.
        const cx = pad.l + i * band + band / 2;
        const anchor = cx + 24 > W ? 'end' : cx - 24 < 0 ? 'start' : 'middle';
        const lx = anchor === 'end' ? W - 2 : anchor === 'start' ? 2 : cx;
        svg.appendChild(el('text', { x: lx.toFixed(2), y: H - 6, 'text-anchor': anchor }, dayLabel(day)));
      }
    });
    svg.appendChild(el('line', { class: 'axis', x1: pad.l, x2: W - pad.r, y1: pad.t + ph, y2: pad.t + ph }));
    if (peak === 0) {
      svg.appendChild(el('text', { class: 'empty', x: pad.l + pw / 2, y: pad.t + ph / 2, 'text-anchor': 'middle' }, opts.empty || 'No usage yet'));
    }
    container.appendChild(svg);
    if (opts.legend !== false) container.appendChild(legend(series));
    return svg;
  }

  function legend(series) {
    const ul = h('ul', { class: 'legend' });
    for (const s of series) {
      const li = h('li');
      const sw = h('span', { class: 'swatch' });
      sw.style.background = s.color;
      li.appendChild(sw);
      li.appendChild(document.createTextNode(s.label));
      ul.appendChild(li);
    }
    return ul;
  }

  // Horizontal bars. rows: [{label, value (number), text (shown at the bar's end)}].
  function hbars(container, rows, opts) {
    opts = opts || {};
    clear(container);
    const W = widthOf(container);
    const rowH = 26;
    const H = Math.max(1, rows.length) * rowH + 8;
    const labelW = Math.min(180, Math.floor(W * 0.34));
    const textW = 86;
    const pw = Math.max(40, W - labelW - textW - 12);
    const peak = Math.max(0, ...rows.map((r) => Number(r.value) || 0));
    const svg = el('svg', { viewBox: '0 0 ' + W + ' ' + H, width: W, height: H, role: 'img', 'aria-label': opts.title || 'chart' });
    if (rows.length === 0) {
      svg.appendChild(el('text', { class: 'empty', x: W / 2, y: 20, 'text-anchor': 'middle' }, opts.empty || 'No data'));
    }
    const maxChars = Math.max(6, Math.floor(labelW / 7));
    rows.forEach((row, i) => {
      const y = 4 + i * rowH;
      const v = Number(row.value) || 0;
      const label = row.label.length > maxChars ? row.label.slice(0, maxChars - 1) + '…' : row.label;
      const t = el('text', { x: labelW - 8, y: y + rowH / 2 + 4, 'text-anchor': 'end' }, label);
      t.appendChild(el('title', {}, row.label));
      svg.appendChild(t);
      const bw = peak > 0 ? Math.max(v > 0 ? 2 : 0, (v / peak) * pw) : 0;
      const r = el('rect', {
        class: 'bar', x: labelW, y: y + 4, width: bw.toFixed(2), height: rowH - 8, rx: 3,
        fill: opts.color || '#2563eb', 'data-label': row.label, 'data-value': v,
      });
      r.appendChild(el('title', {}, row.label + ': ' + row.text));
      svg.appendChild(r);
      svg.appendChild(el('text', { class: 'value-label', x: labelW + bw + 6, y: y + rowH / 2 + 4 }, row.text));
    });
    container.appendChild(svg);
    return svg;
  }

  // Rows of the daily APIs ({day, type, ...}) as one series per record type over `days`.
  function seriesByType(rows, days, metric) {
    const index = new Map(days.map((d, i) => [d, i]));
    return TYPES.map((t) => {
      const values = days.map(() => 0);
      for (const r of rows) {
        const i = index.get(r.day);
        if (r.type === t.key && i !== undefined) values[i] += Number(r[metric]) || 0;
      }
      return Object.assign({}, t, { values });
    });
  }

  function typeLabel(key) {
    const t = TYPES.find((x) => x.key === key);
    return t ? t.label : key;
  }

  // Re-draws on width changes (phones turning, windows resizing).
  function onResize(fn) {
    let last = window.innerWidth;
    let timer = null;
    window.addEventListener('resize', () => {
      if (window.innerWidth === last) return;
      last = window.innerWidth;
      clearTimeout(timer);
      timer = setTimeout(fn, 150);
    });
  }

  // Reads a Gemini error envelope's message, if the body is one.
  async function errorMessage(resp) {
    try {
      const v = await resp.json();
      return (v && v.error && v.error.message) || ('HTTP ' + resp.status);
    } catch (_) {
      return 'HTTP ' + resp.status;
    }
  }

  return { el, h, int, bytes, money, short, dayLabel, dayRange, stackedBars, hbars, seriesByType, typeLabel, onResize, errorMessage, clear, TYPES, MONTHS };
})();
