// Keep the page's #fragment (the tab) through the login: the server never sees it.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const next = document.querySelector("#login-form input[name=next]");
  if (next && location.hash && !next.value.includes("#")) next.value += location.hash;
});
