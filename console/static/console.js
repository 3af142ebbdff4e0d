// The console works without this file; it only adds a "Select all" button to the failures list.
document.addEventListener("DOMContentLoaded", function () {
  var button = document.querySelector("button.select-all");
  if (!button) return;
  var boxes = document.querySelectorAll('#failures input[type="checkbox"][name="ids"]');
  button.hidden = false;
  button.addEventListener("click", function () {
    var all = Array.prototype.every.call(boxes, function (b) { return b.checked; });
    boxes.forEach(function (b) { b.checked = !all; });
    button.textContent = all ? "Select all" : "Select none";
  });
});
