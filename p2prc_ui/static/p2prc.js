// p2prc dashboard: live regions, copy buttons, confirmations. No library, no build step.
// Every page reads and works without it; this only saves reloading.
"use strict";
(function () {
  // A region marked data-live="N" is fetched again every N seconds (the same page, parsed
  // here), unless the tab is hidden or a field inside it has the focus.
  const regions = document.querySelectorAll("[data-live]");
  async function refresh(region) {
    if (document.hidden || region.contains(document.activeElement)) return;
    try {
      const reply = await fetch(location.href, {credentials: "same-origin",
                                                headers: {"X-P2PRC-Live": "1"}});
      if (!reply.ok) return;
      const page = new DOMParser().parseFromString(await reply.text(), "text/html");
      const fresh = page.getElementById(region.id);
      if (fresh && fresh.innerHTML !== region.innerHTML) {
        region.innerHTML = fresh.innerHTML;
        region.dispatchEvent(new CustomEvent("p2prc:updated", {bubbles: true}));
      }
    } catch (err) { /* the next tick tries again */ }
  }
  regions.forEach(function (region) {
    const seconds = Math.max(1, parseInt(region.dataset.live, 10) || 5);
    setInterval(function () { refresh(region); }, seconds * 1000);
  });
  document.addEventListener("click", function (event) {
    const button = event.target.closest("button.copy");
    if (!button) return;
    const source = document.querySelector(button.dataset.copy);
    if (!source) return;
    const text = source.value !== undefined ? source.value : source.textContent;
    navigator.clipboard.writeText(text.trim()).then(function () {
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = "Copy"; }, 1500);
    });
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
