/* FaceAdapt web page: plain JS over the v1 JSON API (docs/SERVICE.md). No framework, no build step. */
(function () {
  'use strict';

  const KEY_STORE = 'faceadapt.apiKey';          // sessionStorage: this tab only
  const DATASET_STORE = 'faceadapt.datasets.';   // localStorage, + a tag of the key (never the key itself)
  const FINAL = ['succeeded', 'failed', 'cancelled'];
  const STAGES = [
    ['prepare', 'Prepare the faces'], ['targets', 'Pseudo targets'], ['finetune', 'Fine-tune'],
    ['evaluate', 'Evaluate'], ['register', 'Register'],
  ];
  const MODE_TEXT = { restored: 'restored', detail_preserving: 'detail-preserving', kept: 'kept' };
  const POLL_MS = 1000;

  const state = {
    key: sessionStorage.getItem(KEY_STORE) || '',
    models: [], cards: {}, restoreFiles: [], domainFiles: [], watch: null, job: null, gridFor: null,
  };
  const $ = (id) => document.getElementById(id);

  /* ---------- small helpers ---------- */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') el.className = v;
      else if (k === 'text') el.textContent = v;
      else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else if (k === 'dataset') Object.assign(el.dataset, v);
      else el.setAttribute(k, v === true ? '' : v);
    }
    for (const c of children.flat()) {
      if (c !== null && c !== undefined && c !== false) el.append(c instanceof Node ? c : String(c));
    }
    return el;
  }
  function say(el, text, kind) {
    el.textContent = text || '';
    el.classList.toggle('error', kind === 'error');
    el.classList.toggle('ok', kind === 'ok');
  }
  function fmtNum(v) {
    if (typeof v !== 'number') return String(v);
    if (Number.isInteger(v)) return String(v);
    return Math.abs(v) >= 100 ? v.toFixed(1) : Math.abs(v) >= 1 ? v.toFixed(2) : v.toPrecision(3);
  }
  function fmtSeconds(s) {
    if (s === null || s === undefined) return '';
    if (s < 60) return `${Math.round(s)} s`;
    const m = Math.floor(s / 60);
    return m < 60 ? `${m} min ${Math.round(s % 60)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
  }
  function fmtTime(ts) {
    const d = new Date(ts);
    return isNaN(d) ? String(ts) : d.toLocaleTimeString();
  }
  function stem(name) { return name.replace(/^.*[\\/]/, '').replace(/\.[^.]*$/, '') || 'image'; }
  function tag(key) {  // FNV-1a of the key: scopes what this browser remembers per tenant without storing the key
    let x = 0x811c9dc5;
    for (let i = 0; i < key.length; i++) { x ^= key.charCodeAt(i); x = Math.imul(x, 0x01000193) >>> 0; }
    return key ? x.toString(16) : 'local';
  }

  /* ---------- the API ---------- */
  class ApiError extends Error {
    constructor(status, body) {
      super((body && (body.detail || body.error)) || `HTTP ${status}`);
      this.status = status; this.body = body || {};
    }
  }
  function authHeaders(extra) {
    const headers = new Headers(extra || {});
    if (state.key) headers.set('Authorization', `Bearer ${state.key}`);
    return headers;
  }
  async function errorBody(res) {
    try { return await res.json(); } catch (e) { return { error: 'http_error', detail: `HTTP ${res.status}` }; }
  }
  async function api(path, opts) {
    opts = opts || {};
    const sentKey = state.key;
    const res = await fetch(path, { ...opts, headers: authHeaders(opts.headers) });
    if (!res.ok) {
      const body = await errorBody(res);
      if (res.status === 401 && sentKey === state.key) askKey(body.detail);  // not for an answer to an old key
      throw new ApiError(res.status, body);
    }
    return res;
  }
  async function apiJSON(path, opts) {
    opts = opts || {};
    const res = await api(path, { ...opts, headers: { Accept: 'application/json', ...(opts.headers || {}) } });
    return res.status === 204 ? null : res.json();
  }
  function errText(err) {
    if (err instanceof ApiError) {
      const b = err.body;
      let t = `${b.error || 'error'}: ${b.detail || err.message}`;
      if (err.status === 401) t += ' (enter an API key)';
      return t;
    }
    return `error: ${err.message || err}`;
  }

  /* ---------- API key ---------- */
  function showKeyState() {
    $('key-state').textContent = state.key ? 'API key set for this tab' : 'No API key';
  }
  function askKey(reason) {
    const dlg = $('key-dialog');
    $('key-reason').textContent = reason ? `The service answered: ${reason}` : 'Enter your API key.';
    if (dlg.open) return;  // already asking (several calls answered 401): keep what is being typed
    $('key-input').value = '';
    dlg.showModal();
    $('key-input').focus();
  }
  function setKey(key) {
    state.key = key;
    if (key) sessionStorage.setItem(KEY_STORE, key); else sessionStorage.removeItem(KEY_STORE);
    showKeyState();
  }
  function initKey() {
    showKeyState();
    $('key-open').addEventListener('click', () => askKey(''));
    $('key-close').addEventListener('click', () => $('key-dialog').close());
    $('key-forget').addEventListener('click', () => { setKey(''); $('key-dialog').close(); refreshAll(); });
    $('key-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const key = $('key-input').value.trim();
      if (!key) { $('key-input').focus(); return; }
      setKey(key);
      $('key-dialog').close();
      refreshAll();
    });
  }

  /* ---------- tabs ---------- */
  function initTabs() {
    const tabs = Array.from(document.querySelectorAll('[role="tab"]'));
    function select(tab, focus) {
      for (const t of tabs) {
        const on = t === tab;
        t.setAttribute('aria-selected', on ? 'true' : 'false');
        t.tabIndex = on ? 0 : -1;
        $(t.getAttribute('aria-controls')).hidden = !on;
      }
      if (focus) tab.focus();
      history.replaceState(null, '', `#${tab.id.slice(4)}`);
    }
    tabs.forEach((t, i) => {
      t.addEventListener('click', () => select(t, false));
      t.addEventListener('keydown', (ev) => {
        const n = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[ev.key];
        if (n === undefined) return;
        ev.preventDefault();
        select(tabs[(n + tabs.length) % tabs.length], true);
      });
    });
    const start = tabs.find((t) => `#${t.id.slice(4)}` === location.hash);
    if (start) select(start, false);
  }

  /* ---------- drop zones ---------- */
  async function entryFiles(entry, prefix) {  // a dropped folder, walked (webkitGetAsEntry)
    if (entry.isFile) {
      const f = await new Promise((ok, ko) => entry.file(ok, ko));
      return [{ file: f, name: prefix + f.name }];
    }
    const reader = entry.createReader();
    const out = [];
    for (;;) {
      const batch = await new Promise((ok, ko) => reader.readEntries(ok, ko));
      if (!batch.length) break;
      for (const e of batch) out.push(...await entryFiles(e, `${prefix}${entry.name}/`));
    }
    return out;
  }
  function dropZone(zone, onFiles) {
    zone.addEventListener('dragover', (ev) => { ev.preventDefault(); zone.classList.add('over'); });
    zone.addEventListener('dragleave', () => zone.classList.remove('over'));
    zone.addEventListener('drop', async (ev) => {
      ev.preventDefault();
      zone.classList.remove('over');
      const entries = Array.from(ev.dataTransfer.items || []).map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry())
        .filter(Boolean);
      if (entries.length) {
        const all = [];
        for (const e of entries) all.push(...await entryFiles(e, ''));
        onFiles(all);
      } else {
        onFiles(Array.from(ev.dataTransfer.files).map((f) => ({ file: f, name: f.name })));
      }
    });
  }

  /* ---------- models ---------- */
  function origin(m, card) {
    const extra = (card && card.extra) || {};
    if (extra.adapted) return m.public ? 'adapted (shared)' : 'adapted by you';
    if (extra.source_file) return 'pulled';
    return m.public ? 'bundled' : 'imported';
  }
  // the size a restorer restores at (ModelCard.restore_size): its serve_size, else its input size
  const restoreSize = (card) => card.serve_size || card.input_size;
  function modelNote(card) {
    if (!card || card.kind !== 'restorer' || !(restoreSize(card) < 256)) return '';
    const s = restoreSize(card);
    const head = card.extra && card.extra.adapted
      ? `${card.name} works at ${s} px (adapted from a small demo restorer)`
      : `${card.name} is the bundled ${s} px demo restorer`;
    return `${head}: faces up to ${2 * s} px are restored at ${s} px, larger ones only get a detail-preserving ` +
      'correction. For real photos pull a 512 px model (faceadapt models pull swinir-face-dtbfr, needs internet).';
  }
  async function loadModels() {
    const models = await apiJSON('/v1/models');
    const details = await Promise.all(models.map((m) => apiJSON(`/v1/models/${encodeURIComponent(m.id)}`)
      .then((d) => d.card).catch(() => null)));
    state.models = models;
    state.cards = {};
    models.forEach((m, i) => { state.cards[m.id] = details[i]; });
    fillModelPickers();
    renderModels();
  }
  function fillModelPickers() {
    const restorers = state.models.filter((m) => m.kind === 'restorer');
    const groups = [['Bundled and pulled', (m) => m.public && !(state.cards[m.id] && state.cards[m.id].extra && state.cards[m.id].extra.adapted)],
      ['Your adapted models', (m) => !m.public || (state.cards[m.id] && state.cards[m.id].extra && state.cards[m.id].extra.adapted)]];
    for (const sel of [$('restore-model'), $('adapt-base')]) {
      const keep = sel.value;
      sel.replaceChildren();
      for (const [label, pick] of groups) {
        const items = restorers.filter(pick);
        if (!items.length) continue;
        sel.append(h('optgroup', { label }, items.map((m) => h('option', { value: m.name, text: m.name }))));
      }
      if (keep && restorers.some((m) => m.name === keep)) sel.value = keep;
    }
    updateModelNote();
  }
  function cardByName(name) {
    const m = state.models.find((x) => x.name === name);
    return m ? state.cards[m.id] : null;
  }
  function updateModelNote() {
    const note = modelNote(cardByName($('restore-model').value));
    $('restore-model-note').textContent = note;
    $('restore-model-note').hidden = !note;
  }
  function figures(card) {  // a few measured numbers from the card, flattened
    const extra = (card && card.extra) || {};
    const src = (extra.evaluation && extra.evaluation.metrics) || extra.metrics || {};
    const rows = [];
    (function walk(obj, path) {
      for (const [k, v] of Object.entries(obj || {})) {
        if (rows.length >= 12) return;
        if (typeof v === 'number' && !Number.isInteger(v)) rows.push([path.concat(k).join(' '), v]);
        else if (v && typeof v === 'object' && !Array.isArray(v)) walk(v, path.concat(k));
      }
    })(src, []);
    return rows;
  }
  function renderModels() {
    const list = $('model-list');
    list.replaceChildren();
    for (const m of state.models) {
      const card = state.cards[m.id] || {};
      const figs = figures(card);
      const dl = h('dl', {},
        h('dt', { text: 'Kind' }), h('dd', { text: `${m.kind} (${origin(m, card)})` }),
        h('dt', { text: 'Architecture' }), h('dd', { text: m.arch }),
        h('dt', { text: 'Input size' }), h('dd', { text: !card.input_size ? '?'
          : restoreSize(card) === card.input_size ? `${card.input_size} px`
            : `${card.input_size} px (restores at ${restoreSize(card)} px)` }),
        h('dt', { text: 'Licence' }), h('dd', { text: card.license || '?' }),
        h('dt', { text: 'Provenance' }), h('dd', { text: card.provenance || '?' }));
      const article = h('article', { class: 'card model', dataset: { name: m.name } },
        h('h3', { text: m.name }),
        card.description ? h('p', { text: card.description }) : null,
        dl,
        figs.length ? h('details', { open: true }, h('summary', { text: 'Figures' }),
          h('table', {}, h('tbody', {}, figs.map(([k, v]) => h('tr', {}, h('th', { scope: 'row', text: k }),
            h('td', { text: fmtNum(v) })))))) : null,
        m.public ? h('p', { class: 'hint', text: 'Shared model: it cannot be deleted here.' })
          : h('button', { type: 'button', class: 'danger', 'aria-label': `Delete the model ${m.name}`,
            onclick: () => deleteModel(m) }, 'Delete'));
      list.append(article);
    }
    if (!state.models.length) list.append(h('p', { text: 'No models.' }));
  }
  async function deleteModel(m) {
    if (!confirm(`Delete the model ${m.name}?`)) return;
    try {
      await api(`/v1/models/${encodeURIComponent(m.id)}`, { method: 'DELETE' });
      say($('models-status'), `Deleted ${m.name}.`, 'ok');
      await loadModels();
    } catch (err) { say($('models-status'), errText(err), 'error'); }
  }

  /* ---------- restore ---------- */
  function pickRestore(items) {
    state.restoreFiles = items.map((i) => i.file).filter((f) => !f.name.startsWith('.'));
    $('restore-picked').textContent = state.restoreFiles.length
      ? `${state.restoreFiles.length} photo(s): ${state.restoreFiles.map((f) => f.name).join(', ')}` : '';
  }
  function b64Blob(b64, type) {
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new Blob([bytes], { type });
  }
  function loaded(img) { return img.decode().catch(() => new Promise((ok) => { img.onload = ok; img.onerror = ok; })); }
  function faceCanvas(img, box, label) {
    const [x1, y1, x2, y2] = box;
    const pad = 0.2 * Math.max(x2 - x1, y2 - y1);
    const sx = Math.max(0, x1 - pad), sy = Math.max(0, y1 - pad);
    const sw = Math.min(img.naturalWidth, x2 + pad) - sx, sh = Math.min(img.naturalHeight, y2 + pad) - sy;
    const c = h('canvas', { role: 'img', 'aria-label': label });
    const scale = 160 / Math.max(sw, sh);
    c.width = Math.max(1, Math.round(sw * scale));
    c.height = Math.max(1, Math.round(sh * scale));
    c.getContext('2d').drawImage(img, sx, sy, sw, sh, 0, 0, c.width, c.height);
    return c;
  }
  let compareCount = 0;
  async function showRestored(file, d) {
    const n = ++compareCount;
    const type = { png: 'image/png', jpeg: 'image/jpeg', webp: 'image/webp' }[d.format] || 'image/png';
    const afterUrl = URL.createObjectURL(b64Blob(d.image, type));
    const beforeUrl = URL.createObjectURL(file);
    const before = h('img', { class: 'before', src: beforeUrl, alt: `${file.name}, before` });
    const after = h('img', { class: 'after', src: afterUrl, alt: `${file.name}, after (restored)` });
    const compare = h('div', { class: 'compare' }, after, before, h('span', { class: 'divider', 'aria-hidden': 'true' }));
    const slider = h('input', { type: 'range', id: `compare-${n}`, min: '0', max: '100', value: '50',
      'aria-valuetext': 'half before, half after' });
    const setPos = () => {
      compare.style.setProperty('--pos', `${slider.value}%`);
      slider.setAttribute('aria-valuetext', `${slider.value}% before`);
    };
    slider.addEventListener('input', setPos);
    setPos();
    const modes = Object.entries(d.modes || {}).map(([k, v]) => `${v} ${MODE_TEXT[k] || k}`).join(', ');
    const faces = h('ol', { class: 'faces' });
    const card = h('article', { class: 'card result', dataset: { file: file.name, facesFound: d.faces_found,
      facesRestored: d.faces_restored, model: d.model } },
      h('h3', { text: file.name }),
      h('p', { class: 'summary', text: `${d.faces_restored} of ${d.faces_found} face(s) restored with ${d.model}` +
        (modes ? ` (${modes})` : '') + `; fidelity ${d.fidelity}.` }),
      compare,
      h('label', { for: `compare-${n}`, text: 'Before / after (left: before, right: after)' }), slider,
      faces,
      h('p', {}, h('a', { class: 'button', href: afterUrl, download: `${stem(file.name)}-restored.${d.format === 'jpeg' ? 'jpg' : d.format}`,
        text: `Download the restored ${d.format.toUpperCase()}` })));
    $('restore-results').prepend(card);
    await Promise.all([loaded(before), loaded(after)]);
    d.faces.forEach((f, i) => {
      const mode = MODE_TEXT[f.mode] || f.mode || '';
      faces.append(h('li', { class: 'face', dataset: { mode: f.mode || '' } },
        h('figure', {},
          h('div', { class: 'pair' }, faceCanvas(before, f.box, `face ${i + 1} before`),
            faceCanvas(after, f.box, `face ${i + 1} after`)),
          h('figcaption', { text: `Face ${i + 1}: ${mode}` + (f.native_size ? `, ${Math.round(f.native_size)} px` : '') +
            (f.fidelity !== null && f.fidelity !== undefined ? `, fidelity ${fmtNum(f.fidelity)}` : '') }))));
    });
    if (!d.faces.length) faces.append(h('li', { text: 'No face was found: the photo is returned as it was.' }));
  }
  async function runRestore(ev) {
    ev.preventDefault();
    const files = state.restoreFiles;
    const status = $('restore-status');
    if (!files.length) { say(status, 'Pick or drop one or more photos first.', 'error'); $('restore-files').focus(); return; }
    const go = $('restore-go');
    go.disabled = true;
    let done = 0, failed = 0;
    for (const file of files) {
      say(status, `Restoring ${file.name} (${done + failed + 1} of ${files.length})...`);
      const fd = new FormData();
      fd.append('image', file, file.name);
      fd.append('model', $('restore-model').value || 'default');
      fd.append('aligned', $('restore-aligned').checked ? 'true' : 'false');
      fd.append('format', $('restore-format').value);
      if (!$('restore-auto').checked) fd.append('fidelity', $('restore-fidelity').value);
      try {
        await showRestored(file, await apiJSON('/v1/restore', { method: 'POST', body: fd }));
        done += 1;
      } catch (err) {
        failed += 1;
        $('restore-results').prepend(h('p', { class: 'error', text: `${file.name}: ${errText(err)}` }));
      }
    }
    go.disabled = false;
    say(status, `Restored ${done} of ${files.length} photo(s)` + (failed ? `; ${failed} failed.` : '.'), failed ? 'error' : 'ok');
  }
  function initRestore() {
    $('restore-files').addEventListener('change', (ev) => pickRestore(Array.from(ev.target.files).map((f) => ({ file: f }))));
    dropZone($('restore-drop'), pickRestore);
    $('restore-model').addEventListener('change', updateModelNote);
    const fid = $('restore-fidelity');
    const showFid = () => { $('restore-fidelity-out').textContent = Number(fid.value).toFixed(2); };
    fid.addEventListener('input', showFid);
    $('restore-auto').addEventListener('change', (ev) => { fid.disabled = ev.target.checked; });
    showFid();
    $('restore-form').addEventListener('submit', runRestore);
  }

  /* ---------- domains ---------- */
  function knownDatasets() {
    try { return JSON.parse(localStorage.getItem(DATASET_STORE + tag(state.key)) || '[]'); } catch (e) { return []; }
  }
  function saveDatasets(list) { localStorage.setItem(DATASET_STORE + tag(state.key), JSON.stringify(list)); }
  function pickDomain(items) {
    state.domainFiles = items.filter((i) => !i.name.split('/').pop().startsWith('.'));
    $('domain-picked').textContent = state.domainFiles.length ? `${state.domainFiles.length} file(s) picked` : '';
  }
  function upload(items, name, onProgress) {  // XMLHttpRequest: fetch() has no upload progress
    return new Promise((resolve, reject) => {
      const fd = new FormData();
      for (const it of items) fd.append('files', it.file, it.name);
      if (name) fd.append('name', name);
      const xhr = new XMLHttpRequest();
      const sentKey = state.key;
      xhr.open('POST', '/v1/datasets');
      xhr.setRequestHeader('Accept', 'application/json');
      if (state.key) xhr.setRequestHeader('Authorization', `Bearer ${state.key}`);
      xhr.upload.addEventListener('progress', (e) => { if (e.lengthComputable) onProgress(e.loaded, e.total); });
      xhr.addEventListener('load', () => {
        let body = null;
        try { body = JSON.parse(xhr.responseText); } catch (e) { body = { error: 'http_error', detail: `HTTP ${xhr.status}` }; }
        if (xhr.status === 201) { resolve(body); return; }
        if (xhr.status === 401 && sentKey === state.key) askKey(body.detail);
        reject(new ApiError(xhr.status, body));
      });
      xhr.addEventListener('error', () => reject(new Error('the upload failed (network error)')));
      xhr.send(fd);
    });
  }
  function fileTable(items, rejected) {
    const why = new Map(rejected.map((r) => [r.file, r.reason]));
    const base = (name) => name.replace(/^.*[\\/]/, '');
    const rows = items.map((it) => {
      const key = why.has(it.name) ? it.name : base(it.name);  // the server may keep only the file's own name
      const reason = why.get(key);
      why.delete(key);
      const isZip = /\.zip$/i.test(it.name);
      const ok = reason === undefined;
      const thumb = !isZip && it.file.type.startsWith('image/')
        ? h('img', { class: 'thumb', src: URL.createObjectURL(it.file), alt: '', loading: 'lazy' }) : '';
      return h('tr', { class: ok ? 'accepted' : 'rejected' }, h('td', {}, thumb), h('td', { text: it.name }),
        h('td', { text: ok ? (isZip ? 'unpacked' : 'accepted') : `rejected: ${reason}` }));
    });
    for (const [file, reason] of why) {  // entries of a zip
      rows.push(h('tr', { class: 'rejected' }, h('td', {}), h('td', { text: file }), h('td', { text: `rejected: ${reason}` })));
    }
    return h('table', { class: 'files' }, h('caption', { text: 'Files' }),
      h('thead', {}, h('tr', {}, h('th', { scope: 'col', text: 'Preview' }), h('th', { scope: 'col', text: 'File' }),
        h('th', { scope: 'col', text: 'Result' }))), h('tbody', {}, rows));
  }
  async function runUpload(ev) {
    ev.preventDefault();
    const items = state.domainFiles;
    const status = $('domain-status');
    if (!items.length) { say(status, 'Pick files, a zip or a folder first.', 'error'); $('domain-files').focus(); return; }
    const box = $('domain-progress-box'), bar = $('domain-progress');
    box.hidden = false;
    bar.value = 0;
    $('domain-go').disabled = true;
    say(status, `Uploading ${items.length} file(s)...`);
    const result = $('domain-result');
    result.replaceChildren();
    try {
      const ds = await upload(items, $('domain-name').value.trim(), (loaded, total) => {
        bar.value = Math.round((100 * loaded) / total);
        $('domain-progress-text').textContent = `${bar.value}%`;
        if (loaded >= total) say(status, 'Uploaded; finding the faces...');
      });
      bar.value = 100;
      say(status, `Domain ${ds.name || ds.id}: ${ds.images_accepted} image(s) accepted, ${ds.faces_found} face(s) found, ` +
        `${ds.rejected.length} rejected.`, 'ok');
      result.append(fileTable(items, ds.rejected));
      const list = knownDatasets().filter((d) => d.id !== ds.id);
      list.unshift({ id: ds.id, name: ds.name, images: ds.images_accepted, faces: ds.faces_found, created: ds.created_at });
      saveDatasets(list);
      renderDatasets();
      $('adapt-dataset').value = ds.id;
    } catch (err) {
      say(status, errText(err), 'error');
      if (err instanceof ApiError && Array.isArray(err.body.rejected)) result.append(fileTable(items, err.body.rejected));
    } finally {
      $('domain-go').disabled = false;
    }
  }
  function renderDatasets() {
    const list = knownDatasets();
    const ul = $('domain-list');
    ul.replaceChildren(...list.map((d) => h('li', { dataset: { id: d.id } },
      h('span', { text: `${d.name || d.id}: ${d.images} image(s), ${d.faces} face(s)` }), ' ',
      h('button', { type: 'button', class: 'danger', 'aria-label': `Delete the domain ${d.name || d.id}`,
        onclick: () => deleteDataset(d) }, 'Delete'))));
    if (!list.length) ul.append(h('li', { text: 'None yet.' }));
    const sel = $('adapt-dataset');
    const keep = sel.value;
    sel.replaceChildren(...list.map((d) => h('option', { value: d.id, text: `${d.name || d.id} (${d.images} images)` })));
    if (!list.length) sel.append(h('option', { value: '', text: 'Upload a domain first' }));
    if (list.some((d) => d.id === keep)) sel.value = keep;
  }
  async function refreshDatasets() {  // forget the ones deleted elsewhere
    const list = knownDatasets();
    const alive = await Promise.all(list.map((d) => apiJSON(`/v1/datasets/${encodeURIComponent(d.id)}`)
      .then((x) => ({ id: x.id, name: x.name, images: x.images_accepted, faces: x.faces_found, created: x.created_at }))
      .catch((err) => (err instanceof ApiError && err.status === 404 ? null : d))));
    saveDatasets(alive.filter(Boolean));
    renderDatasets();
  }
  async function deleteDataset(d) {
    if (!confirm(`Delete the domain ${d.name || d.id} and its images?`)) return;
    try {
      await api(`/v1/datasets/${encodeURIComponent(d.id)}`, { method: 'DELETE' });
      saveDatasets(knownDatasets().filter((x) => x.id !== d.id));
      say($('domain-status'), `Deleted the domain ${d.name || d.id}.`, 'ok');
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) saveDatasets(knownDatasets().filter((x) => x.id !== d.id));
      say($('domain-status'), errText(err), 'error');
    }
    renderDatasets();
  }
  function initDomains() {
    $('domain-files').addEventListener('change', (ev) => pickDomain(Array.from(ev.target.files).map((f) => ({ file: f, name: f.name }))));
    $('domain-folder').addEventListener('change', (ev) => pickDomain(Array.from(ev.target.files)
      .map((f) => ({ file: f, name: f.webkitRelativePath || f.name }))));
    dropZone($('domain-drop'), pickDomain);
    $('domain-form').addEventListener('submit', runUpload);
  }

  /* ---------- adapt ---------- */
  function mergeDeep(into, from) {
    for (const [k, v] of Object.entries(from)) {
      if (v && typeof v === 'object' && !Array.isArray(v) && into[k] && typeof into[k] === 'object') mergeDeep(into[k], v);
      else into[k] = v;
    }
    return into;
  }
  function adaptParams() {
    const text = $('adapt-json').value.trim();
    let params = {};
    if (text) {
      params = JSON.parse(text);  // a SyntaxError is reported by the caller
      if (!params || typeof params !== 'object' || Array.isArray(params)) throw new SyntaxError('the JSON must be an object');
    }
    const num = (id) => ($(id).value.trim() === '' ? undefined : Number($(id).value));
    const ft = {};
    if (num('adapt-steps') !== undefined) ft.steps = num('adapt-steps');
    if (num('adapt-batch') !== undefined) ft.batch_size = num('adapt-batch');
    if (num('adapt-lr') !== undefined) ft.lr = num('adapt-lr');
    const over = {};
    if (Object.keys(ft).length) over.finetune = ft;
    if (num('adapt-eval') !== undefined) over.eval_fraction = num('adapt-eval');
    if (!$('adapt-gate').checked) over.quality_gate = false;
    return mergeDeep(params, over);
  }
  async function startAdaptation(ev) {
    ev.preventDefault();
    const status = $('adapt-status');
    const name = $('adapt-name').value.trim();
    if (!$('adapt-name').checkValidity() || !name) {
      say(status, 'Give the new model a name: lowercase letters, digits, ".", "_", "-".', 'error');
      $('adapt-name').focus();
      return;
    }
    if (!$('adapt-dataset').value) { say(status, 'Upload a domain first (Domains).', 'error'); return; }
    let params;
    try { params = adaptParams(); } catch (err) {
      say(status, `The parameters are not valid JSON: ${err.message}`, 'error');
      $('adapt-json').focus();
      return;
    }
    $('adapt-go').disabled = true;
    try {
      const job = await apiJSON('/v1/adaptations', {
        method: 'POST', headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ dataset_id: $('adapt-dataset').value, base_model: $('adapt-base').value || 'default',
          name, params }),
      });
      say(status, `Adaptation ${job.name} started.`, 'ok');
      watch(job.id);
      loadJobs();
    } catch (err) {
      say(status, errText(err), 'error');
    } finally {
      $('adapt-go').disabled = false;
    }
  }
  function stageRow(key, label, job) {
    const p = job.progress || {};
    const cur = STAGES.findIndex(([k]) => k === p.stage);
    const me = STAGES.findIndex(([k]) => k === key);
    let st = 'pending', done = 0, total = 1, detail = '';
    if (job.status === 'succeeded' || (cur >= 0 && me < cur)) { st = 'done'; done = 1; }
    else if (me === cur) {
      st = FINAL.includes(job.status) ? job.status : 'running';
      done = p.done || 0; total = p.total || 0;
      const bits = [];
      if (total) bits.push(`${done} / ${total}`);
      if (p.stage_elapsed_s !== null && p.stage_elapsed_s !== undefined) bits.push(`${fmtSeconds(p.stage_elapsed_s)} so far`);
      if (p.eta_s !== null && p.eta_s !== undefined && st === 'running') bits.push(`about ${fmtSeconds(p.eta_s)} left`);
      detail = bits.join(' · ');
    }
    const bar = h('progress', { max: String(total || 1), 'aria-label': `${label} progress` });
    if (st === 'running' && !total) bar.removeAttribute('value');  // indeterminate until the stage knows its total
    else bar.value = me === cur && st !== 'done' ? done : done ? (total || 1) : 0;
    return h('li', { class: `stage ${st}`, dataset: { stage: key, state: st } },
      h('span', { class: 'label', text: label }), bar,
      h('span', { class: 'detail', text: st === 'running' ? detail || 'started' : st === 'done' ? 'done' : st === 'pending' ? '' : `${st}${detail ? ` at ${detail}` : ''}` }));
  }
  function renderJob(job) {
    state.job = job;
    $('job-view').hidden = false;
    $('job-view').dataset.status = job.status;
    $('job-view').dataset.id = job.id;
    $('job-title').textContent = `${job.name} (${job.id})`;
    $('job-status').textContent = job.status + (job.cancel_requested && !FINAL.includes(job.status) ? ' (cancel requested)' : '');
    $('job-stages').replaceChildren(...STAGES.map(([k, label]) => stageRow(k, label, job)));
    $('job-cancel').hidden = FINAL.includes(job.status);
    $('job-cancel').disabled = FINAL.includes(job.status) || job.cancel_requested;
    const err = $('job-error');
    err.hidden = !job.error;
    err.textContent = job.error ? `Error: ${job.error}` : '';
    if (Array.isArray(job.events)) {
      const log = $('job-events');
      if (log.children.length !== job.events.length) {
        log.replaceChildren(...job.events.map((e) => h('li', { class: e.kind },
          h('time', { datetime: e.ts, text: fmtTime(e.ts) }), ' ', e.stage ? h('span', { class: 'tag', text: e.stage }) : '',
          ' ', e.message)));
        log.scrollTop = log.scrollHeight;
      }
    }
    renderEvaluation(job);
  }
  function renderEvaluation(job) {
    const out = $('job-result');
    const ev = job.evaluation || {};
    if (!FINAL.includes(job.status) || !Object.keys(ev).length) { out.replaceChildren(); state.gridFor = null; return; }
    if (state.gridFor === job.id) return;
    state.gridFor = job.id;
    const m = ev.metrics || {};
    const cols = ['input', 'base', 'adapted'].filter((c) => m[c]);
    const names = [...new Set(cols.flatMap((c) => Object.keys(m[c])))];
    const gate = ev.gate || {};
    const nodes = [h('h4', { text: 'Before / after on the held-out images' })];
    if (names.length) {
      nodes.push(h('table', { class: 'figures' },
        h('thead', {}, h('tr', {}, h('th', { scope: 'col', text: 'figure' }), cols.map((c) => h('th', { scope: 'col', text: c })))),
        h('tbody', {}, names.map((n) => h('tr', {}, h('th', { scope: 'row', text: n }),
          cols.map((c) => h('td', { text: m[c][n] === undefined ? '' : fmtNum(m[c][n]) })))))));
    }
    if (gate.verdict) {
      nodes.push(h('p', { class: `gate ${gate.verdict}`, id: 'job-gate' }, 'Quality gate: ', h('strong', { text: gate.verdict }),
        (gate.reasons || []).length ? ` (${gate.reasons.join('; ')})` : ''));
    }
    if (job.status === 'succeeded' && job.model_id) {
      nodes.push(h('p', { class: 'ok', text: `The model ${job.name} is registered: pick it in Restore.` }));
    }
    out.replaceChildren(...nodes);
    if (ev.grid_url) {
      const cols2 = (ev.grid_columns || ['input', 'base', 'adapted', 'pseudo target']).join(', ');
      api(ev.grid_url).then((r) => r.blob()).then((b) => {
        out.append(h('figure', { class: 'grid' }, h('img', { id: 'job-grid', src: URL.createObjectURL(b),
          alt: `Evaluation grid of ${job.name}; columns: ${cols2}` }), h('figcaption', { text: `Columns: ${cols2}` })));
      }).catch((err) => out.append(h('p', { class: 'error', text: `grid: ${errText(err)}` })));
    }
  }
  function stopWatch() {
    if (state.watch) state.watch.abort();
    state.watch = null;
  }
  function sleep(ms, signal) {
    return new Promise((ok) => {
      const t = setTimeout(ok, ms);
      signal.addEventListener('abort', () => { clearTimeout(t); ok(); }, { once: true });
    });
  }
  function applyStreamMessage(type, data) {
    // GET /v1/adaptations/{id}/stream: `status` (status and progress), `event` (one job event), `end` (it finished)
    const job = { ...state.job };
    if (type === 'event') {
      const evs = job.events || [];
      if (!evs.some((e) => e.id === data.id)) job.events = evs.concat([data]);
    } else if (type === 'status' || type === 'end') {
      for (const k of ['status', 'progress', 'error', 'model_id', 'cancel_requested']) if (k in data) job[k] = data[k];
    }
    renderJob(job);
    return type === 'end' || FINAL.includes(job.status);
  }
  function lastEventId(job) {
    return (job.events || []).reduce((m, e) => (typeof e.id === 'number' && e.id > m ? e.id : m), 0);
  }
  async function streamJob(id, signal) {
    // one connection to the stream, resuming after the last event shown (Last-Event-ID); {done: the job ended,
    // got: messages taken}. fetch() rather than EventSource: it sends the API key header.
    let res;
    const result = { done: false, got: 0 };
    try {
      res = await fetch(`/v1/adaptations/${encodeURIComponent(id)}/stream`, { signal,
        headers: authHeaders({ Accept: 'text/event-stream', 'Last-Event-ID': String(lastEventId(state.job)) }) });
    } catch (e) { return result; }
    if (!res.ok || !(res.headers.get('content-type') || '').startsWith('text/event-stream') || !res.body) return result;
    $('job-transport').textContent = '(live: server-sent events)';
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = '', type = 'message', data = [];
    for (;;) {
      let chunk;
      try { chunk = await reader.read(); } catch (e) { return result; }
      if (chunk.done) return result;
      buf += chunk.value;
      let nl;
      while ((nl = buf.search(/\r\n|\r|\n/)) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + (buf.startsWith('\r\n', nl) ? 2 : 1));
        if (line === '') {
          if (data.length) {
            let parsed = null;
            try { parsed = JSON.parse(data.join('\n')); } catch (e) { parsed = null; }
            if (parsed) {
              result.got += 1;
              $('job-view').dataset.streamed = String(++state.streamed);  // messages taken from the stream
            }
            if (parsed && applyStreamMessage(type, parsed)) {
              reader.cancel().catch(() => {});
              result.done = true;
              return result;
            }
          }
          type = 'message'; data = [];
        } else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
        else if (line.startsWith('event:')) type = line.slice(6).trim();
      }
    }
  }
  async function watch(id) {
    stopWatch();
    const ctl = new AbortController();
    state.watch = ctl;
    state.gridFor = null;
    state.streamed = 0;
    delete $('job-view').dataset.streamed;
    $('job-events').replaceChildren();
    $('job-result').replaceChildren();
    try {
      renderJob(await apiJSON(`/v1/adaptations/${encodeURIComponent(id)}`));
      // follow the stream; when it is cut after some messages, reconnect where it stopped; when it gives nothing
      // (an old server, a proxy that buffers), poll
      for (let tries = 0; tries < 50 && !FINAL.includes(state.job.status) && !ctl.signal.aborted; tries++) {
        const r = await streamJob(id, ctl.signal);
        if (r.done || !r.got) break;
      }
      $('job-transport').textContent = FINAL.includes(state.job.status) ? '' : `(polling every ${POLL_MS / 1000} s)`;
      while (!ctl.signal.aborted) {  // the fallback, and the final full answer (figures) after a stream
        const job = await apiJSON(`/v1/adaptations/${encodeURIComponent(id)}`, { signal: ctl.signal });
        renderJob(job);
        if (FINAL.includes(job.status)) break;
        await sleep(POLL_MS, ctl.signal);
      }
      $('job-transport').textContent = '';
      if (state.job.status === 'succeeded') loadModels().catch(() => {});
      loadJobs().catch(() => {});
    } catch (err) {
      if (!ctl.signal.aborted) say($('adapt-status'), errText(err), 'error');
    }
  }
  async function cancelJob() {
    if (!state.job) return;
    $('job-cancel').disabled = true;
    try {
      renderJob({ ...state.job, ...(await apiJSON(`/v1/adaptations/${encodeURIComponent(state.job.id)}/cancel`, { method: 'POST' })) });
      say($('adapt-status'), 'Cancel requested: the running stage stops at its next batch.');
    } catch (err) {
      say($('adapt-status'), errText(err), 'error');
      $('job-cancel').disabled = false;
    }
  }
  async function loadJobs() {
    const jobs = await apiJSON('/v1/adaptations?limit=20');
    const ul = $('job-list');
    ul.replaceChildren(...jobs.map((j) => h('li', { dataset: { id: j.id, status: j.status } },
      h('span', { text: `${j.name}: ${j.status}` }), ' ',
      h('button', { type: 'button', class: 'secondary', 'aria-label': `Show the adaptation ${j.name}`,
        onclick: () => watch(j.id) }, 'Show'))));
    if (!jobs.length) ul.append(h('li', { text: 'None yet.' }));
  }
  function initAdapt() {
    $('adapt-form').addEventListener('submit', startAdaptation);
    $('job-cancel').addEventListener('click', cancelJob);
  }

  /* ---------- start ---------- */
  let refreshes = 0;
  async function refreshAll() {
    const mine = ++refreshes;
    renderDatasets();
    const results = await Promise.allSettled([loadModels(), refreshDatasets(), loadJobs()]);
    if (mine !== refreshes) return;  // a newer refresh (a new key) has the last word
    const failed = results.find((r) => r.status === 'rejected');
    if (failed) say($('models-status'), errText(failed.reason), 'error');
    else say($('models-status'), '');
    document.body.dataset.ready = failed ? 'error' : 'yes';
  }
  document.addEventListener('DOMContentLoaded', () => {
    initTabs();
    initKey();
    initRestore();
    initDomains();
    initAdapt();
    refreshAll();
  });
})();
