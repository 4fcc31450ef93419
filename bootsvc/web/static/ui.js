// bootsvc UI: small progressive enhancements; every page works without them.
(function () {
  "use strict";

  // --- scanner-friendly forms: a barcode scanner types the code and presses Enter.
  // Enter moves to the next field instead of submitting; on the last field it lands on the submit button.
  function fieldsOf(form) {
    return Array.prototype.filter.call(form.querySelectorAll("input, select, button[type=submit]"), function (el) {
      return el.type !== "hidden" && !el.disabled && el.offsetParent !== null;
    });
  }
  document.querySelectorAll("form[data-scanner]").forEach(function (form) {
    form.addEventListener("keydown", function (ev) {
      var el = ev.target;
      if (ev.key !== "Enter" || el.tagName === "BUTTON" || el.tagName === "TEXTAREA") { return; }
      ev.preventDefault();
      var list = fieldsOf(form);
      var i = list.indexOf(el);
      var next = list[i + 1];
      if (next) { next.focus(); if (next.select) { try { next.select(); } catch (e) { /* select elements */ } } }
    });
    // Show what a scanned MAC will be stored as (the server normalises the same way).
    form.querySelectorAll("input[data-mac]").forEach(function (input) {
      var note = document.createElement("p");
      note.className = "mac-preview";
      input.parentNode.appendChild(note);
      function update() {
        var raw = input.value.replace(/[^0-9a-fA-F]/g, "").toLowerCase();
        note.textContent = raw.length === 12 && !/[^0-9a-fA-F:.\-\s]/.test(input.value)
          ? "\u2192 " + raw.match(/../g).join(":") : "";
      }
      input.addEventListener("input", update);
      update();
    });
    if (!form.querySelector("[autofocus]")) {
      var empty = fieldsOf(form).filter(function (el) { return el.tagName === "INPUT" && !el.value; })[0];
      if (empty) { empty.focus(); }
    }
  });

  // --- relative times ("3m 12s") that keep counting between refreshes
  function human(s) {
    var neg = s < 0; s = Math.abs(Math.round(s));
    var d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60), r = s % 60;
    var t = d ? d + "d " + h + "h" : h ? h + "h " + m + "m" : m ? m + "m " + r + "s" : r + "s";
    return neg ? t + " ago" : t;
  }
  function tick() {
    var now = Date.now();
    document.querySelectorAll("[data-since]").forEach(function (el) {
      el.textContent = human((now - Date.parse(el.getAttribute("data-since"))) / 1000);
    });
    document.querySelectorAll("[data-until]").forEach(function (el) {
      var left = (Date.parse(el.getAttribute("data-until")) - now) / 1000;
      el.textContent = left >= 0 ? "in " + human(left) : "passed " + human(-left) + " ago";
    });
  }
  tick();
  setInterval(tick, 1000);

  // --- machine page: poll status JSON, swap panels when the state signature changes
  var machine = document.getElementById("machine");
  if (machine) {
    var url = machine.getAttribute("data-poll-url");
    var every = parseInt(machine.getAttribute("data-poll-ms"), 10) || 2000;
    var live = document.getElementById("live");
    var healthBadge = document.getElementById("machine-health");
    var failures = 0;
    var poll = function () {
      if (document.hidden) { return; }
      var q = url + "?sig=" + encodeURIComponent(machine.getAttribute("data-sig")) +
        "&after=" + encodeURIComponent(machine.getAttribute("data-last-event"));
      fetch(q, { credentials: "same-origin", headers: { "Accept": "application/json" } })
        .then(function (r) {
          if (r.status === 401) { window.location.reload(); throw new Error("logged out"); }
          if (!r.ok) { throw new Error("HTTP " + r.status); }
          return r.json();
        })
        .then(function (d) {
          failures = 0;
          live.textContent = "live \u00b7 updated " + new Date().toISOString().slice(11, 19) + "Z";
          live.classList.remove("stale");
          if (d.panels_html) {
            document.getElementById("panels").innerHTML = d.panels_html;
            machine.setAttribute("data-sig", d.sig);
            tick();
          }
          if (d.events_html) {
            var body = document.getElementById("events");
            var tmp = document.createElement("tbody");
            tmp.innerHTML = d.events_html;
            Array.prototype.slice.call(tmp.children).reverse().forEach(function (row) {
              if (!body.querySelector('[data-event-id="' + row.getAttribute("data-event-id") + '"]')) {
                row.classList.add("new");
                body.insertBefore(row, body.firstChild);
              }
            });
          }
          machine.setAttribute("data-last-event", d.last_event);
          if (healthBadge && d.health) {
            healthBadge.className = "badge big h-" + d.health;
            healthBadge.textContent = d.health_text;
          }
        })
        .catch(function () {
          failures += 1;
          if (failures >= 2) { live.textContent = "NOT LIVE: cannot reach bootsvc, retrying"; live.classList.add("stale"); }
        });
    };
    setInterval(poll, every);
  }

  // --- rack view: refresh the racks every few seconds
  var racks = document.getElementById("racks");
  if (racks) {
    var rurl = racks.getAttribute("data-refresh-url");
    var rms = parseInt(racks.getAttribute("data-refresh-ms"), 10) || 5000;
    setInterval(function () {
      if (document.hidden) { return; }
      fetch(rurl, { credentials: "same-origin" }).then(function (r) {
        if (r.redirected) { window.location.reload(); throw new Error("logged out"); }
        if (r.ok) { return r.text(); }
        throw new Error("HTTP " + r.status);
      }).then(function (html) { racks.innerHTML = html; }).catch(function () { /* keep the last view */ });
    }, rms);
  }
})();
