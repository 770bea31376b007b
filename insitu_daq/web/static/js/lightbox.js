// Full resolution in a lightbox (the link in it opens a new tab). Used by both pages.

export class Lightbox {
  constructor() {
    this.dialog = document.getElementById("lightbox");
    this.img = document.getElementById("lightbox-img");
    this.caption = document.getElementById("lightbox-caption");
    this.link = document.getElementById("lightbox-open");
    document.getElementById("lightbox-close").addEventListener("click", () => this.close());
    // A click on the picture or the backdrop closes it, as image viewers do.
    this.img.addEventListener("click", () => this.close());
    this.dialog.addEventListener("click", (event) => {
      if (event.target === this.dialog) this.close();
    });
    this.dialog.addEventListener("close", () => this.img.removeAttribute("src"));
  }

  open(url, caption) {
    if (!url) return;
    this.img.src = url;
    this.link.href = url;
    this.caption.textContent = caption ?? "";
    if (!this.dialog.open) this.dialog.showModal();
  }

  close() {
    if (this.dialog.open) this.dialog.close();
  }
}
