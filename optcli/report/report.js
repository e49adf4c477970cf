// optcli's report page: learning curves as inline SVG, median line and band over seeds per optimizer.
// Hover shows the values at the nearest epoch, a legend click hides an optimizer, a drag zooms the x axis
// (double-click resets), the x axis switches between epochs, optimizer steps and training seconds, y log/linear.
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var W = 720, H = 340, M = { l: 70, r: 16, t: 12, b: 42 };
  var XLABEL = { epoch: "epoch", steps: "optimizer steps", seconds: "training seconds" };

  function el(tag, attrs, parent, text) {
    var node = document.createElementNS(NS, tag);
    for (var k in attrs) node.setAttribute(k, attrs[k]);
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }

  function fmt(v) {
    if (v === null || v === undefined || !isFinite(v)) return "—";
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(3);
    return a >= 1 ? String(Number(v.toPrecision(4))) : v.toFixed(4);
  }

  function fmtTick(v) {
    var a = Math.abs(v);
    return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(2) : String(Number(v.toPrecision(4)));
  }

  function niceTicks(lo, hi, log) {
    if (log) {
      var out = [];
      for (var p = Math.floor(lo); p <= Math.ceil(hi); p++) if (p >= lo - 1e-9 && p <= hi + 1e-9) out.push(p);
      if (out.length >= 2) return out;
      // less than two decades: round values in value space, placed on the log axis
      return niceTicks(Math.pow(10, lo), Math.pow(10, hi), false).filter(function (v) { return v > 0; }).map(Math.log10);
    }
    var span = hi - lo || 1, step = Math.pow(10, Math.floor(Math.log10(span / 5)));
    var mult = [1, 2, 5, 10].find(function (m) { return span / (step * m) <= 6; });
    step *= mult;
    var ticks = [];
    for (var t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(t);
    return ticks;
  }

  function Plot(root, spec) {
    this.root = root;
    this.spec = spec;
    this.x = "epoch";
    this.log = spec.log;
    this.hidden = {};
    this.zoom = null;
    this.controls();
    this.svg = el("svg", { viewBox: "0 0 " + W + " " + H, class: "plot-svg", role: "img" }, root);
    this.tip = document.createElement("div");
    this.tip.className = "tip";
    root.appendChild(this.tip);
    this.legend();
    this.draw();
  }

  Plot.prototype.controls = function () {
    var self = this, bar = document.createElement("div");
    bar.className = "controls";
    var select = document.createElement("select");
    ["epoch", "steps", "seconds"].forEach(function (k) {
      var o = document.createElement("option");
      o.value = k;
      o.textContent = "x: " + XLABEL[k];
      select.appendChild(o);
    });
    select.onchange = function () { self.x = select.value; self.zoom = null; self.draw(); };
    var label = document.createElement("label"), box = document.createElement("input");
    box.type = "checkbox";
    box.checked = this.log;
    box.disabled = !this.spec.log_ok;
    box.onchange = function () { self.log = box.checked; self.draw(); };
    label.appendChild(box);
    label.appendChild(document.createTextNode(" log y"));
    bar.appendChild(select);
    bar.appendChild(label);
    this.root.appendChild(bar);
  };

  Plot.prototype.legend = function () {
    var self = this, list = document.createElement("div");
    list.className = "legend";
    this.spec.series.forEach(function (s) {
      var item = document.createElement("button");
      item.type = "button";
      item.innerHTML = '<span class="swatch"></span>';
      item.firstChild.style.background = s.color;
      item.appendChild(document.createTextNode(s.label));
      item.onclick = function () {
        self.hidden[s.label] = !self.hidden[s.label];
        item.classList.toggle("off", !!self.hidden[s.label]);
        self.draw();
      };
      list.appendChild(item);
    });
    this.root.appendChild(list);
  };

  Plot.prototype.visible = function () {
    var self = this;
    return this.spec.series.filter(function (s) { return !self.hidden[s.label] && s.mid.length; });
  };

  Plot.prototype.scales = function (series) {
    var self = this, xs = [], ys = [];
    series.forEach(function (s) {
      s[self.x].forEach(function (x, i) {
        if (self.zoom && (x < self.zoom[0] || x > self.zoom[1])) return;
        xs.push(x);
        [s.lo[i], s.hi[i], s.mid[i]].forEach(function (y) { if (!self.log || y > 0) ys.push(y); });
      });
    });
    if (!xs.length) return null;
    var x0 = this.zoom ? this.zoom[0] : Math.min.apply(null, xs), x1 = this.zoom ? this.zoom[1] : Math.max.apply(null, xs);
    var ty = function (y) { return self.log ? Math.log10(y) : y; };
    var y0 = Math.min.apply(null, ys.map(ty)), y1 = Math.max.apply(null, ys.map(ty));
    if (x1 === x0) { x0 -= 0.5; x1 += 0.5; }
    if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
    var pad = (y1 - y0) * 0.04;
    y0 -= pad; y1 += pad;
    return {
      x0: x0, x1: x1, y0: y0, y1: y1, ty: ty,
      sx: function (x) { return M.l + (x - x0) / (x1 - x0) * (W - M.l - M.r); },
      sy: function (y) { return H - M.b - (ty(y) - y0) / (y1 - y0) * (H - M.t - M.b); },
      inv: function (px) { return x0 + (px - M.l) / (W - M.l - M.r) * (x1 - x0); },
    };
  };

  Plot.prototype.axes = function (sc) {
    var g = el("g", { class: "axes" }, this.svg);
    niceTicks(sc.x0, sc.x1, false).forEach(function (t) {
      var x = sc.sx(t);
      el("line", { x1: x, x2: x, y1: M.t, y2: H - M.b, class: "grid" }, g);
      el("text", { x: x, y: H - M.b + 16, "text-anchor": "middle" }, g, fmtTick(t));
    });
    var self = this;
    niceTicks(sc.y0, sc.y1, this.log).forEach(function (t) {
      var v = self.log ? Math.pow(10, t) : t, y = sc.sy(v);
      el("line", { x1: M.l, x2: W - M.r, y1: y, y2: y, class: "grid" }, g);
      el("text", { x: M.l - 6, y: y + 4, "text-anchor": "end" }, g, fmtTick(v));
    });
    el("text", { x: (M.l + W - M.r) / 2, y: H - 6, "text-anchor": "middle", class: "axis-label" }, g, XLABEL[this.x]);
    el("text", { x: 14, y: (M.t + H - M.b) / 2, "text-anchor": "middle", class: "axis-label",
      transform: "rotate(-90 14 " + (M.t + H - M.b) / 2 + ")" }, g, this.spec.ylabel + (this.log ? " (log)" : ""));
  };

  Plot.prototype.draw = function () {
    var self = this;
    while (this.svg.firstChild) this.svg.removeChild(this.svg.firstChild);
    var series = this.visible(), sc = this.scales(series);
    if (!sc) { el("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, this.svg, "no optimizer shown"); return; }
    this.axes(sc);
    el("clipPath", { id: this.spec.id + "-clip" }, this.svg).appendChild(
      el("rect", { x: M.l, y: M.t, width: W - M.l - M.r, height: H - M.t - M.b }));
    var body = el("g", { "clip-path": "url(#" + this.spec.id + "-clip)" }, this.svg);
    series.forEach(function (s) {
      var ok = function (i) { return !self.log || (s.lo[i] > 0 && s.mid[i] > 0); };
      var idx = s.mid.map(function (_, i) { return i; }).filter(ok);
      var pt = function (i, key) { return sc.sx(s[self.x][i]).toFixed(1) + "," + sc.sy(s[key][i]).toFixed(1); };
      var band = idx.map(function (i) { return pt(i, "hi"); }).concat(idx.slice().reverse().map(function (i) { return pt(i, "lo"); }));
      if (band.length) el("polygon", { points: band.join(" "), fill: s.color, class: "band" }, body);
      el("polyline", { points: idx.map(function (i) { return pt(i, "mid"); }).join(" "), stroke: s.color, class: "median" }, body);
    });
    this.interact(sc, series);
  };

  Plot.prototype.interact = function (sc, series) {
    var self = this, svg = this.svg, start = null;
    var cursor = el("line", { y1: M.t, y2: H - M.b, class: "cursor", visibility: "hidden" }, svg);
    var brush = el("rect", { y: M.t, height: H - M.t - M.b, class: "brush", visibility: "hidden" }, svg);
    var local = function (ev) {
      var r = svg.getBoundingClientRect();
      return (ev.clientX - r.left) / r.width * W;
    };
    svg.onmousemove = function (ev) {
      var px = local(ev), x = sc.inv(px), lines = [];
      series.forEach(function (s) {
        var xs = s[self.x], best = 0;
        xs.forEach(function (v, i) { if (Math.abs(v - x) < Math.abs(xs[best] - x)) best = i; });
        lines.push('<span class="swatch" style="background:' + s.color + '"></span>' + escapeHtml(s.label) +
          " epoch " + s.epoch[best] + ": " + fmt(s.mid[best]) + " [" + fmt(s.lo[best]) + ", " + fmt(s.hi[best]) + "]");
      });
      cursor.setAttribute("x1", px); cursor.setAttribute("x2", px); cursor.setAttribute("visibility", "visible");
      self.tip.innerHTML = lines.join("<br>");
      self.tip.style.display = "block";
      if (start !== null) {
        brush.setAttribute("x", Math.min(start, px)); brush.setAttribute("width", Math.abs(px - start));
        brush.setAttribute("visibility", "visible");
      }
    };
    svg.onmouseleave = function () { cursor.setAttribute("visibility", "hidden"); self.tip.style.display = "none"; };
    svg.onmousedown = function (ev) { start = local(ev); ev.preventDefault(); };
    svg.onmouseup = function (ev) {
      var end = local(ev);
      if (start !== null && Math.abs(end - start) > 8) {
        var a = sc.inv(Math.min(start, end)), b = sc.inv(Math.max(start, end));
        self.zoom = [a, b];
        self.draw();
      }
      start = null;
      brush.setAttribute("visibility", "hidden");
    };
    svg.ondblclick = function () { self.zoom = null; self.draw(); };
  };

  function escapeHtml(text) {
    var d = document.createElement("div");
    d.textContent = text;
    return d.innerHTML;
  }

  var data = JSON.parse(document.getElementById("optcli-data").textContent);
  data.plots.forEach(function (spec) {
    var root = document.getElementById(spec.id);
    if (root) new Plot(root, spec);
  });
  document.body.setAttribute("data-plots-drawn", String(document.querySelectorAll("svg.plot-svg").length));
})();
