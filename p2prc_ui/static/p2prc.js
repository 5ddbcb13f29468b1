// p2prc dashboard: live regions, copy buttons, confirmations. No library, no build step.
// Every page reads and works without it; this only saves reloading.
"use strict";
(function () {
  // A region marked data-live="N" is fetched again every N seconds (the same page, parsed
  // here), unless the tab is hidden or a field inside it has the focus. A fresh copy without
  // data-live (an update that finished) ends its polling.
  async function refresh(region, timer) {
    if (document.hidden || region.contains(document.activeElement)) return;
    try {
      const reply = await fetch(location.href, {credentials: "same-origin",
                                                headers: {"X-P2PRC-Live": "1"}});
      if (!reply.ok) return;
      const page = new DOMParser().parseFromString(await reply.text(), "text/html");
      const fresh = page.getElementById(region.id);
      if (!fresh) return;
      if (fresh.innerHTML !== region.innerHTML) {
        region.innerHTML = fresh.innerHTML;
        region.dispatchEvent(new CustomEvent("p2prc:updated", {bubbles: true}));
      }
      if (!fresh.hasAttribute("data-live")) clearInterval(timer);
    } catch (err) { /* the next tick tries again */ }
  }
  document.querySelectorAll("[data-live]").forEach(function (region) {
    const seconds = Math.max(1, parseInt(region.dataset.live, 10) || 5);
    const timer = setInterval(function () { refresh(region, timer); }, seconds * 1000);
  });
  // Copy buttons work only with this script: shown by it.
  function showCopies() {
    document.querySelectorAll("button.copy[hidden]").forEach(function (b) { b.hidden = false; });
  }
  showCopies();
  document.addEventListener("p2prc:updated", showCopies);
  // Asked here, in a dialog; without this script the server asks on a page of its own.
  document.addEventListener("submit", function (event) {
    const form = event.target;
    const question = form.dataset.confirm;
    if (!question) return;
    if (!window.confirm(question)) { event.preventDefault(); return; }
    const confirmed = document.createElement("input");
    confirmed.type = "hidden";
    confirmed.name = "confirmed";
    confirmed.value = "1";
    form.appendChild(confirmed);
  });
})();
